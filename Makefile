# The two commands of the README: `make demo` (set up, run the main job) and `make test`; `make bench` after the demo.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo bench test test-fast clean

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

bench: setup
	$(PY) -m bench

test: setup
	$(PY) -m pytest -q --durations=40 tests

# The developers' subset: every test not marked slow (no DeepSpeed, Beam, SLURM or training), under 3 minutes.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache
