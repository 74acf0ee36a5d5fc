"""Teacher preparation: give a bare encoder a masked-LM head (`python -m teacher`), or train a small decoder
teacher and student tokenizers from scratch (`python -m teacher.decoder`)."""
