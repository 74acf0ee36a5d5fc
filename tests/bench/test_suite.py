"""`make bench`: every benchmark module is in the suite, and RESULTS.md's generated block is replaced, nothing else."""

from pathlib import Path

from bench.suite import BEGIN, END, SUITE, Bench, Outcome, missing_inputs, results_block, rewrite_results

HELPERS = {"__init__", "__main__", "suite", "base_tree", "local_runs", "task_methods_table"}  # not benchmarks


def test_every_benchmark_module_is_in_the_suite():
    modules = {p.stem for p in Path("bench").glob("*.py")} - HELPERS
    assert sorted(b.name for b in SUITE) == sorted(modules)
    for b in SUITE:
        assert "def main" in Path(f"bench/{b.name}.py").read_text(), b.name


def _outcome(name, code=0, output="| a | b |\n|---|---|\n| 1 | 2 |"):
    return Outcome(Bench(name, ("--rounds", "1"), what=f"{name} figures"), f"python -m bench.{name} --rounds 1",
                   12.4, code, output)


def test_results_block_is_inserted_then_replaced_keeping_the_record():
    original = "# Benchmark results\n\nIntro.\n\n## Old section\n\nkept 1.23\n"
    first = rewrite_results(original, results_block([_outcome("x")], "2026-12-02", "cpu", 75.0))
    assert first.startswith("# Benchmark results\n\nIntro.\n\n" + BEGIN)
    assert first.endswith(END + "\n\n## Old section\n\nkept 1.23\n")
    assert "| `bench.x` | x figures | 12 | ok |" in first and "1.2 min" in first
    assert "### `python -m bench.x --rounds 1`" in first and "| 1 | 2 |" in first
    second = rewrite_results(first, results_block([_outcome("y", code=124, output="out")], "2026-12-03", "cpu", 30.0))
    assert second.count(BEGIN) == 1 and second.count(END) == 1
    assert "bench.x" not in second and "| `bench.y` | y figures | 12 | **failed (124)** |" in second
    assert second.split(END, 1)[1] == first.split(END, 1)[1]  # the hand-written record is untouched
    assert second.split(BEGIN, 1)[0] == first.split(BEGIN, 1)[0]


def test_missing_demo_outputs_are_named():
    b = Bench("demo_reader", (), needs=("runs/definitely-not-here/teacher",))
    assert missing_inputs([b]) == ["runs/definitely-not-here/teacher (bench.demo_reader)"]
