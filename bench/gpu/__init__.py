"""`python -m bench.gpu`: the one-command GPU check (bf16 step throughput and MFU, chunked vs dense KD at a 128k
vocabulary, NCCL ZeRO-2 on every GPU, the online-teacher step). A package, not a bench/*.py module: it is GPU-only,
so `make bench` (bench/suite.py, run on CPU) leaves it out. plan.py: what runs and the FLOPs arithmetic (no torch);
steps.py: the in-process measurements; zero.py: the torchrun part; __main__.py: the command.
"""
