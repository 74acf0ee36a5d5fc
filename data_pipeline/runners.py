"""Where the pipeline runs: Beam's DirectRunner on this machine (the default), or a Dask cluster.

`--runner dask` uses our ShardedDaskRunner (data_pipeline/dask_runner.py) on either a cluster that is already
running (`--scheduler tcp://HOST:PORT` or `--scheduler-file PATH`, the file `dask scheduler --scheduler-file`
writes) or one this process starts for itself (`--local-workers N`). Before any work the cluster is checked:
the scheduler answers, `--min-workers` have joined, and every worker can import this project (a worker started
from another folder or environment is the usual reason a Dask job fails late).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from kdlib.errors import ConfigError, KDError, ReaderError
from kdlib.runtime.jsonl import text_of

DASK_RUNNER = "data_pipeline.dask_runner.ShardedDaskRunner"
ADDRESS = re.compile(r"^(tcp|tls)://[A-Za-z0-9._-]+:(\d{1,5})$")
WAIT_SECONDS = 300  # how long --min-workers waits for workers to join


def add_runner_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where it runs (default: Beam's DirectRunner, 2 processes)")
    group.add_argument("--runner", default=None, metavar="NAME",
                       help="'dask' for a Dask cluster; any other value is Beam's own --runner (DirectRunner, ...)")
    group.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                       help="with --runner dask: the address of a running Dask scheduler")
    group.add_argument("--scheduler-file", default=None, metavar="PATH",
                       help="with --runner dask: the file `dask scheduler --scheduler-file PATH` wrote")
    group.add_argument("--local-workers", type=int, default=None, metavar="N",
                       help="with --runner dask: start a Dask cluster of N worker processes here (the default, N=2)")
    group.add_argument("--min-workers", type=int, default=1, metavar="N",
                       help=f"with --runner dask: wait up to {WAIT_SECONDS}s until N workers have joined")


@dataclass(frozen=True)
class RunnerChoice:
    """The runner flags, checked: which runner, and for Dask which cluster."""

    runner: Optional[str]  # None: Beam's DirectRunner with our defaults; "dask"; or a Beam runner name
    scheduler: Optional[str] = None
    scheduler_file: Optional[str] = None
    local_workers: Optional[int] = None
    min_workers: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunnerChoice":
        dask_only = {"--scheduler": args.scheduler, "--scheduler-file": args.scheduler_file,
                     "--local-workers": args.local_workers}
        if args.runner != "dask":
            given = [flag for flag, value in dask_only.items() if value is not None]
            if given or args.min_workers != 1:
                raise ConfigError(f"{(given or ['--min-workers'])[0]}: only with --runner dask")
            return cls(runner=args.runner)
        chosen = [flag for flag, value in dask_only.items() if value is not None]
        if len(chosen) > 1:
            raise ConfigError(f"{chosen[1]}: give one of --scheduler, --scheduler-file or --local-workers, "
                              f"not {' and '.join(chosen)}")
        if args.scheduler is not None and not ADDRESS.fullmatch(args.scheduler) or (
                args.scheduler is not None and not 1 <= int(ADDRESS.fullmatch(args.scheduler).group(2)) <= 65535):
            raise ConfigError(f"--scheduler: expected tcp://HOST:PORT with a port in 1-65535, got {args.scheduler!r}")
        if args.scheduler_file is not None:
            check_scheduler_file(args.scheduler_file)
        if args.local_workers is not None and not 1 <= args.local_workers <= 256:
            raise ConfigError(f"--local-workers: expected 1..256, got {args.local_workers}")
        if not 1 <= args.min_workers <= 100000:
            raise ConfigError(f"--min-workers: expected a positive count, got {args.min_workers}")
        local = args.local_workers if args.local_workers is not None else (
            2 if args.scheduler is None and args.scheduler_file is None else None)
        return cls(runner="dask", scheduler=args.scheduler, scheduler_file=args.scheduler_file, local_workers=local,
                   min_workers=max(args.min_workers, local or 1))

    @contextlib.contextmanager
    def beam_args(self, beam_args: list[str], num_shards: int) -> Iterator[list[str]]:
        """Beam's options for this choice; for --local-workers, the local cluster lives as long as the block."""
        if self.runner != "dask":
            yield direct_defaults(beam_args + ([f"--runner={self.runner}"] if self.runner else []))
            return
        from distributed import LocalCluster  # Dask loads only when it is asked for

        for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("distributed", "tornado")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)  # (importing it set levels) our error line says it

        quiet = ["--default_sdk_harness_log_level", "CRITICAL"]
        partitions = [] if any(a.startswith("--dask_npartitions") for a in beam_args) else [
            f"--dask_npartitions={num_shards}"]  # one shard per partition after the shuffle
        args = [f"--runner={DASK_RUNNER}", *partitions, *beam_args, *quiet]
        with contextlib.ExitStack() as stack:
            if self.local_workers is not None:
                cluster = stack.enter_context(LocalCluster(n_workers=self.local_workers, threads_per_worker=1,
                                                           processes=True, dashboard_address=None))
                args.append(f"--dask_client_address={cluster.scheduler_address}")
                where = f"a local Dask cluster of {self.local_workers} workers ({cluster.scheduler_address})"
            elif self.scheduler is not None:
                args.append(f"--dask_client_address={self.scheduler}")
                where = f"the Dask scheduler at {self.scheduler}"
            else:
                args.append(f"--dask_scheduler_file={self.scheduler_file}")
                where = f"the Dask scheduler of {self.scheduler_file}"
            workers = check_cluster(self, where, cluster.scheduler_address if self.local_workers else None)
            print(f"[data_pipeline] runner: {where}, {workers} worker(s)")
            yield args


def check_scheduler_file(path: str) -> None:
    """The file `dask scheduler --scheduler-file` wrote, read before any work: Dask itself would wait for a missing
    one, and fail on a folder or a file of something else only once output_dir was claimed."""
    file = Path(path)
    what = "the file `dask scheduler --scheduler-file PATH` writes (start the scheduler first)"
    if not file.is_file():
        raise ConfigError(f"--scheduler-file: {path!r} {'is a folder' if file.is_dir() else 'does not exist'}; "
                          f"expected {what}")
    try:
        text = text_of(file)  # a bad byte named by line, as every reader of ours names it
    except ReaderError as err:
        raise ConfigError(f"--scheduler-file: {err}; expected {what}") from None
    except OSError as err:
        raise ConfigError(f"--scheduler-file: {path!r}: {err.strerror}; expected {what}") from None
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or "://" not in address or not address.isprintable():
        raise ConfigError(f"--scheduler-file: {path!r}: no scheduler address in it (a JSON object with \"address\": "
                          f"\"tcp://HOST:PORT\"); expected {what}")


def check_cluster(choice: RunnerChoice, where: str, address: Optional[str]) -> int:
    """The scheduler answers, enough workers joined, and each imports this project; returns the worker count."""
    from distributed import Client

    target = {"address": address or choice.scheduler} if (address or choice.scheduler) else {
        "scheduler_file": choice.scheduler_file}
    try:
        client = Client(**target, timeout=30)
    except (OSError, TimeoutError, ValueError) as err:
        raise KDError(f"no Dask scheduler answered at {where}: {err}") from None
    with client:
        try:
            client.wait_for_workers(choice.min_workers, timeout=WAIT_SECONDS)
        except (TimeoutError, OSError):
            joined = len(client.scheduler_info()["workers"])
            raise KDError(f"--min-workers: {joined} of {choice.min_workers} Dask worker(s) joined {where} within "
                          f"{WAIT_SECONDS}s") from None
        missing = {worker: problem for worker, problem in client.run(_import_problem).items() if problem}
        if missing:
            worker, problem = sorted(missing.items())[0]
            raise KDError(f"Dask worker {worker} cannot run the pipeline ({problem}); start workers from the "
                          "project's folder with its .venv and PYTHONPATH set to it")
        return len(client.scheduler_info()["workers"])


def _import_problem() -> Optional[str]:
    """Run on each worker: None when this project's pipeline code imports there."""
    try:
        importlib.import_module("data_pipeline.dask_runner")  # what every task of the pipeline unpickles
    except Exception as err:  # any failure to import is the answer, not an error of this check
        return f"{type(err).__name__}: {err}"
    return None


def dask_failure(err: BaseException) -> Optional[KDError]:
    """A lost scheduler or a task whose workers kept dying, as one line; None for any other error."""
    name, module = type(err).__name__, type(err).__module__ or ""
    if name == "KilledWorker":
        return KDError(f"Dask gave up on a task after its workers died repeatedly ({err}); the finished shards are "
                       "kept: rerun the same command to build the rest")
    if module.startswith(("distributed", "tornado", "data_pipeline.dask_runner")) or name in (
            "CommClosedError", "FutureCancelledError", "CancelledError"):
        return KDError(f"lost the Dask scheduler during the run: {name}: {err}; the finished shards are "
                       "kept: rerun the same command to build the rest")
    return None


def check_beam_options(beam_args: list[str], ours: argparse.ArgumentParser, runner: Optional[str]) -> None:
    """Every argument our parser did not claim must be one of Beam's pipeline options (of every runner Beam has
    loaded, ours included): a mistyped `--sett` is an error here, where Beam would drop it with a warning."""
    from apache_beam.options.pipeline_options import PipelineOptions  # Beam loads only past --help

    if runner == "dask":
        importlib.import_module("data_pipeline.dask_runner")  # registers Beam's DaskOptions
    elif runner is not None:
        check_runner_name(runner)
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False, exit_on_error=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    try:  # a value Beam's own parser refuses is our one error line, not Beam's usage of every option it has
        _, unknown = parser.parse_known_args(beam_args)
    except argparse.ArgumentError as err:
        raise ConfigError(f"{err.argument_name}: {err.message} (a Beam pipeline option)") from None
    if unknown:
        known = [flag for p in (parser, ours) for action in p._actions for flag in action.option_strings]
        flag = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1)
        raise ConfigError(f"{flag}: not an option of data_pipeline nor of Beam's pipeline options"
                          + (f" (did you mean {close[0]}?)" if close else ""))


def check_runner_name(runner: str) -> None:
    """--runner: a runner Beam knows by name (as Beam matches it: any case, "Runner" optional) or a runner class's
    dotted path whose module imports; anything else would fail only after output_dir was claimed."""
    from apache_beam.options.pipeline_options import StandardOptions  # Beam loads only past --help

    names = {n.lower() for n in StandardOptions.KNOWN_RUNNER_NAMES}
    if runner.lower() in names or runner.lower() + "runner" in names:
        return
    module, _, name = runner.rpartition(".")
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", runner):
        try:
            if isinstance(getattr(importlib.import_module(module), name, None), type):
                return
        except ImportError:
            pass
    raise ConfigError(f"--runner: expected dask, a Beam runner ({', '.join(StandardOptions.KNOWN_RUNNER_NAMES)}) "
                      f"or the dotted path of a runner class that imports here, got {runner!r}")


def direct_defaults(beam_args: list[str]) -> list[str]:
    """With no runner named, use DirectRunner with 2 worker processes (this machine's cores)."""
    joined = " ".join(beam_args)
    args = list(beam_args)
    if "--default_sdk_harness_log_level" not in joined:
        # workers log noise, and each error in full: the main process reports errors (details in output_dir/logs/)
        args += ["--default_sdk_harness_log_level", "CRITICAL"]
    if "--runner" in joined and "DirectRunner" not in joined:
        return args
    if "--direct_num_workers" not in joined:
        args += ["--direct_num_workers", "2"]
    if "--direct_running_mode" not in joined:
        args += ["--direct_running_mode", "multi_processing"]
    return args
