"""Teacher preparation: turn a bare encoder into a masked-LM teacher (`python -m teacher`)."""
