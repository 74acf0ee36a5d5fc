"""`python -m bench [--only a,b] [--list] [--no-write]`: run every benchmark and rewrite bench/RESULTS.md.

What `make bench` runs: every benchmark in bench/, one after another, at the sizes of bench/suite.py; then
bench/RESULTS.md's generated block is rewritten with the date, the machine, each command and what it printed.
Reads the demo's outputs: run `make demo` first.
Exit status 0 all ran, 1 some failed (the block says which), 2 an input is missing or a name is unknown.
"""

from __future__ import annotations

import sys
import time

from bench.suite import RESULTS, SUITE, machine, missing_inputs, results_block, rewrite_results, run_one
from kdlib.runtime.cli import stage_parser
from kdlib.runtime.io import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("bench", __doc__, config=False)
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    parser.add_argument("--no-write", action="store_true", help="leave bench/RESULTS.md as it is")
    args = parser.parse_args(argv)
    names = [x for x in args.only.split(",") if x]
    unknown = sorted(set(names) - {b.name for b in SUITE})
    if unknown:
        print(f"--only: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(b.name for b in SUITE)}",
              file=sys.stderr)
        return 2
    benches = [b for b in SUITE if not names or b.name in names]
    if args.list:
        for b in benches:
            print(f"python -m bench.{b.name} {' '.join(b.args)}")
        return 0
    missing = missing_inputs(benches)
    if missing:
        print("missing demo outputs (run `make demo` first): " + "; ".join(missing), file=sys.stderr)
        return 2
    date, host, t0, outcomes = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine(), time.time(), []
    print(f"[bench] {len(benches)} benchmarks on {host}", flush=True)
    for i, b in enumerate(benches, 1):
        print(f"[bench {i}/{len(benches)}] python -m bench.{b.name} {' '.join(b.args)}", flush=True)
        outcome = run_one(b)
        outcomes.append(outcome)
        state = "ok" if outcome.returncode == 0 else f"FAILED ({outcome.returncode}), log runs/bench/make_bench/{b.name}.log"
        print(f"[bench {i}/{len(benches)}] {b.name}: {outcome.seconds:.0f} s, {state}", flush=True)
    total = time.time() - t0
    if not args.no_write:
        atomic_write_text(RESULTS, rewrite_results(RESULTS.read_text(), results_block(outcomes, date, host, total)))
        print(f"[bench] {RESULTS.relative_to(RESULTS.parents[1])} rewritten", flush=True)
    failed = [o.bench.name for o in outcomes if o.returncode != 0]
    print(f"[bench] {len(outcomes) - len(failed)}/{len(outcomes)} ran in {total / 60:.1f} min"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
