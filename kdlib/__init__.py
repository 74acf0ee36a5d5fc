"""kdlib: the library every stage shares (configs, model loading, fingerprints, readers, losses, cache)."""

__version__ = "0.1.0"
