"""Which task each optimizer step trains on, so that a large task does not drown the small ones.

Task i is drawn with probability p_i = n_i ** alpha / sum_j n_j ** alpha (n_i its training rows):
alpha = 1 is proportional to size (MT-DNN's default: the tasks' batches shuffled together), alpha = 0
uniform over tasks. In between, small tasks are up-weighted sub-linearly. BAM (Clark et al. 2019,
google-research/bam `task_weighting.py`) weights tasks by n_i ** 0.75 (`task_weight_exponent`),
realised with copies of small datasets plus per-example loss weights rather than by sampling; the
same marginal weighting is reached here by sampling with alpha = 0.75. BAM's *annealing* is teacher
annealing (kdlib/losses/schedules.py), not of the sampling. Annealed *sampling* is Stickland & Murray (2019,
PALs): alpha_e = 1 - 0.8 (e - 1) / (E - 1), from 1 to 0.2 over the epochs; `anneal_to` /
`anneal_steps` give that here, linearly per draw: alpha_t = alpha + (anneal_to - alpha) min(1, t / anneal_steps).

The sampler is deterministic: one uniform from numpy Generator(PCG64(seed)) per draw, inverted through
the cumulative probabilities. Every rank builds it with the same seed, so all ranks pick the same task
at every step without communicating. Its state (draw count + the bit generator's state, with its
128-bit integers as decimal strings) is JSON-safe and a restored sampler continues the identical
sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


def _unit_interval(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")


@dataclass
class TaskSamplingConfig:
    """Task i is sampled with probability proportional to n_i ** alpha."""

    alpha: float = 0.5  # exponent on task sizes: 1 proportional to size, 0 uniform (BAM weights tasks by n ** 0.75)
    anneal_to: Optional[float] = None  # null: alpha is fixed; else alpha moves linearly to this over anneal_steps draws
    anneal_steps: int = 0  # draws (optimizer steps) over which alpha anneals to anneal_to (then stays there)

    def __post_init__(self) -> None:
        _unit_interval("alpha", self.alpha)
        if self.anneal_to is not None:
            _unit_interval("anneal_to", self.anneal_to)
        if isinstance(self.anneal_steps, bool) or not isinstance(self.anneal_steps, int) or self.anneal_steps < 0:
            raise ValueError(f"anneal_steps: expected an integer >= 0, got {self.anneal_steps!r}")
        if self.anneal_to is not None and self.anneal_steps < 1:
            raise ValueError(f"anneal_steps: expected >= 1 when anneal_to is set, got {self.anneal_steps}")
        if self.anneal_to is None and self.anneal_steps:
            raise ValueError(f"anneal_steps: expected 0 when anneal_to is null (nothing to anneal to), "
                             f"got {self.anneal_steps}")

    def alpha_at(self, draw: int) -> float:
        """The exponent used for draw number `draw` (0-based)."""
        if self.anneal_to is None:
            return float(self.alpha)
        frac = min(1.0, draw / self.anneal_steps)
        return float(self.alpha + (self.anneal_to - self.alpha) * frac)


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    sizes = list(sizes)
    if not sizes:
        raise ValueError("sizes: expected at least one task size, got none")
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"sizes: expected positive integers (rows per task), got {n!r} for task {i}")
    return [int(n) for n in sizes]


def task_probabilities(sizes: Sequence[int], alpha: float) -> np.ndarray:
    """float64 p_i = n_i ** alpha / sum_j n_j ** alpha, computed as exp(alpha (log n_i - max log n)) so that
    large sizes and alpha near 1 cannot overflow; sums to 1 up to rounding."""
    sizes = _check_sizes(sizes)
    _unit_interval("alpha", alpha)
    logs = np.log(np.asarray(sizes, dtype=np.float64))
    weights = np.exp(float(alpha) * (logs - logs.max()))
    return weights / weights.sum()


def _rng_state(rng: np.random.Generator) -> dict:
    """The bit generator's state with every integer as a decimal string (PCG64's are 128-bit)."""
    state = rng.bit_generator.state
    return {"bit_generator": state["bit_generator"],
            "state": {k: str(v) for k, v in state["state"].items()},
            "has_uint32": int(state["has_uint32"]), "uinteger": str(state["uinteger"])}


def _set_rng_state(rng: np.random.Generator, saved: dict) -> None:
    rng.bit_generator.state = {"bit_generator": saved["bit_generator"],
                               "state": {k: int(v) for k, v in saved["state"].items()},
                               "has_uint32": int(saved["has_uint32"]), "uinteger": int(saved["uinteger"])}


class TaskSampler:
    """One task index per optimizer step; deterministic in (sizes, config, seed) and resumable."""

    def __init__(self, sizes: Sequence[int], config: Optional[TaskSamplingConfig] = None, seed: int = 0):
        self.sizes = _check_sizes(sizes)
        self.config = config or TaskSamplingConfig()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.draws = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._cdf_alpha: Optional[float] = None
        self._cdf = np.empty(0)

    def probabilities(self) -> np.ndarray:
        """The distribution the next draw uses."""
        return task_probabilities(self.sizes, self.config.alpha_at(self.draws))

    def next_task(self) -> int:
        """Draw the task of the next optimizer step (advances the state by one draw)."""
        alpha = self.config.alpha_at(self.draws)
        if alpha != self._cdf_alpha:  # fixed alpha: computed once; annealing: once per draw (a few tasks)
            self._cdf, self._cdf_alpha = np.cumsum(task_probabilities(self.sizes, alpha)), alpha
        u = self._rng.random()
        self.draws += 1
        # u < cdf[-1] but for rounding (cdf[-1] may be 1 - 1e-16): clamp to the last task
        return min(int(np.searchsorted(self._cdf, u, side="right")), len(self.sizes) - 1)

    def state_dict(self) -> dict:
        """JSON-serialisable: json.dumps / json.loads round-trips it exactly."""
        return {"seed": self.seed, "sizes": list(self.sizes), "draws": self.draws, "rng": _rng_state(self._rng)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved sampler stopped; a state of another seed or other task sizes is
        refused (it would silently change the task sequence)."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"seed: the saved task sampler used seed {state['seed']}, this one {self.seed}")
        if [int(n) for n in state["sizes"]] != self.sizes:
            raise ValueError(f"sizes: the saved task sampler had task sizes {state['sizes']}, this one {self.sizes}")
        draws = int(state["draws"])
        if draws < 0:
            raise ValueError(f"draws: expected >= 0, got {draws}")
        _set_rng_state(self._rng, state["rng"])
        self.draws = draws


__all__ = ["TaskSamplingConfig", "task_probabilities", "TaskSampler"]
