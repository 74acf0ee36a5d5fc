"""kdlib: the library every stage shares, one sub-package per concern (see kdlib/README.md).

runtime/ plumbing, text/ text handling, tasks/ labelled tasks, teachers/ what a teacher gives, students/ how a
student is built, losses/ the objectives, cache/ the transfer-set format, training/ the training core, deploy/
ONNX and int8. At the top level only what every sub-package may import: config (the typed-config loader),
schemas (config pieces shared by several stages) and errors.
"""

__version__ = "0.1.0"
