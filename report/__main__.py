"""`python -m report --config configs/demo_report.yaml [--set key=value ...]`: write the demo's report folder.

Reads what the stages of scripts/demo.sh wrote (through their configs' output_dir) and writes report.md, numbers.json
and the PNGs into output_dir. Exit status 0 done, 2 a missing or inconsistent input, named.
"""

import sys

from kdlib.runtime.cli import run_stage
from report.build import build_report
from report.config import ReportConfig


def main(argv: list[str] | None = None) -> int:
    def run(cfg: ReportConfig, source: str) -> None:
        path = build_report(cfg, source)
        print(f"[report] {path}", flush=True)

    return run_stage("report", __doc__, ReportConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
