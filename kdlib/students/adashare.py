"""AdaShare (Sun et al. 2020, "AdaShare: Learning What To Share For Efficient Deep Multi-Task Learning"): each task
learns which transformer layers of the shared encoder it executes.

Per (task, layer) a two-way policy (execute, skip) is a learned logit pair. While the weights train, each
forward pass draws every learned policy with Gumbel-softmax: the layer's output is u * layer(h) + (1 - u) * h,
u the soft "execute" sample at temperature tau, so a skipped layer is the identity of the residual stream and
the choice stays differentiable. The run has three parts:
  * warm-up (`warmup_fraction` of the search steps): every layer executes; only the weights train;
  * policy learning with AdaShare's curriculum: the top layer's policies learn first, one more layer joins
    every `curriculum_fraction / L` of the phase, the rest execute; tau falls geometrically from
    `temperature_start` to `temperature_end`;
  * then policies are drawn from the learned probabilities (`policy: sample`; the most probable one is a
    candidate too) and the one with the best validation accuracy under the searched weights is fixed (AdaShare
    samples several and keeps the best), or the most probable one is (`argmax`); the student is retrained from its initialisation with each task executing only its selected layers.
The regularisers are registered losses (kdlib.losses.policy): sparsity pushes each learned policy towards
skipping; sharing pulls the tasks' policies together, more strongly in lower layers.

Policy logits train at their own learning rate (`policy_learning_rate`, AdaShare uses 10x the weights'),
in their own optimizer group without weight decay (kdlib.training.lr_groups `rates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

POLICY_PARAMETER = r"(^|\.)policy_logits$"  # the name kdlib.training.lr_groups gives its own learning rate
Gate = Union[bool, Tensor]  # True: execute, False: skip, a scalar tensor: soft execute weight


@dataclass
class AdaShareConfig:
    """Per-task layer selection for a multi-task student (policy search, then retraining with fixed policies)."""

    enabled: bool = False  # also train the AdaShare student (arm multitask-adashare) beside the dense one
    search_steps: int = 300  # optimizer steps of the policy search run (weights and policies together)
    warmup_fraction: float = 0.2  # of search_steps: weights only, every layer executed
    curriculum_fraction: float = 0.5  # of the policy phase: the learned layers grow from the top one to all
    policy_learning_rate: float = 0.01  # peak learning rate of the policy logits (AdaShare: 0.01)
    temperature_start: float = 5.0  # Gumbel-softmax temperature when policy learning starts (AdaShare: 5)
    temperature_end: float = 0.5  # ... at the end of the search (geometric decay in between)
    sparsity_weight: float = 0.05  # weight of adashare_sparsity (towards skipping)
    sharing_weight: float = 0.05  # weight of adashare_sharing (towards the same policy in every task)
    policy: Literal["sample", "argmax"] = "sample"  # how the fixed policy is drawn from the learned probabilities
    candidates: int = 8  # policy sample: the most probable policy and draws up to this many, the best on validation kept
    min_layers: int = 1  # every task executes at least this many layers (the most probable ones)

    def __post_init__(self) -> None:
        if isinstance(self.search_steps, bool) or not isinstance(self.search_steps, int) or self.search_steps < 2:
            raise ValueError(f"search_steps: expected an integer >= 2, got {self.search_steps!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction: expected a fraction in [0, 1), got {self.warmup_fraction!r}")
        if not 0.0 < self.curriculum_fraction <= 1.0:
            raise ValueError(f"curriculum_fraction: expected a fraction in (0, 1], got {self.curriculum_fraction!r}")
        for name in ("policy_learning_rate", "temperature_start", "temperature_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        for name in ("sparsity_weight", "sharing_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        for name in ("min_layers", "candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


# ---------------------------------------------------------------- sampling

def gumbel_noise(shape: tuple, *, generator: Optional[torch.Generator] = None, dtype=torch.float32) -> Tensor:
    """Standard Gumbel samples -log(-log U), U uniform in (0, 1) (clamped away from both ends)."""
    u = torch.rand(shape, generator=generator, dtype=dtype).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def gumbel_softmax(logits: Tensor, temperature: float, noise: Tensor) -> Tensor:
    """softmax((logits + noise) / temperature) over the last axis -- Jang et al. 2017; as temperature -> 0 it
    becomes the one-hot argmax of logits + noise, a draw from softmax(logits)."""
    return torch.softmax((logits + noise.to(logits.dtype)) / temperature, dim=-1)


# ---------------------------------------------------------------- schedule

def learned_layers(step: int, total: int, cfg: AdaShareConfig, num_layers: int) -> int:
    """How many top layers have learned policies at `step` of `total`: 0 in the warm-up, then 1 .. num_layers."""
    start = cfg.warmup_fraction * total
    if step < start:
        return 0
    progress = (step - start) / max(total - start, 1e-12)
    return min(num_layers, 1 + int(progress * num_layers / cfg.curriculum_fraction))


def temperature(step: int, total: int, cfg: AdaShareConfig) -> float:
    """Geometric from temperature_start (policy learning begins) to temperature_end (the last step)."""
    start = cfg.warmup_fraction * total
    progress = min(1.0, max(0.0, (step - start) / max(total - 1 - start, 1e-12)))
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** progress


def fixed_policy(select_probs: np.ndarray, how: str, seed: int, min_layers: int = 1) -> list[list[bool]]:
    """Each task's executed layers, drawn once from its learned probabilities (Bernoulli, seeded) or by
    argmax (p >= 0.5); a task left with fewer than min_layers gets its most probable layers added."""
    probs = np.asarray(select_probs, dtype=np.float64)
    if how == "sample":
        chosen = np.random.Generator(np.random.PCG64(seed)).random(probs.shape) < probs
    elif how == "argmax":
        chosen = probs >= 0.5
    else:
        raise ValueError(f"policy: expected 'sample' or 'argmax', got {how!r}")
    for task, row in enumerate(probs):
        need = min(min_layers, len(row)) - int(chosen[task].sum())
        if need > 0:
            for layer in [i for i in np.argsort(-row, kind="stable") if not chosen[task, i]][:need]:
                chosen[task, layer] = True
    return [[bool(v) for v in row] for row in chosen]


def candidate_policies(select_probs: np.ndarray, cfg: AdaShareConfig, seed: int, fold: int) -> list[list[list[bool]]]:
    """The policies to choose from after the search: the most probable one first, then (policy: sample) draws
    from the learned probabilities up to cfg.candidates in all, each seeded by (seed, fold, draw), so folds and
    seeds draw independently. AdaShare samples several and keeps the best on validation (see write_policies)."""
    found = [fixed_policy(select_probs, "argmax", 0, cfg.min_layers)]
    if cfg.policy == "sample":
        for draw in range(1, cfg.candidates):
            state = int(np.random.SeedSequence([seed, fold, draw]).generate_state(1)[0])
            found.append(fixed_policy(select_probs, "sample", state, cfg.min_layers))
    return found


# ---------------------------------------------------------------- policies

class TaskPolicies(nn.Module):
    """The (task, layer) policies: learned logits (search), or a fixed execute/skip table (retraining)."""

    def __init__(self, num_tasks: int, num_layers: int, cfg: Optional[AdaShareConfig] = None,
                 fixed: Optional[list[list[bool]]] = None):
        super().__init__()
        if (cfg is None) == (fixed is None):
            raise ValueError("TaskPolicies: expected exactly one of cfg (learned policies) or fixed")
        self.num_tasks, self.num_layers, self.cfg = num_tasks, num_layers, cfg
        self.fixed = [list(map(bool, row)) for row in fixed] if fixed is not None else None
        if self.fixed is not None and (len(self.fixed) != num_tasks or any(len(r) != num_layers for r in self.fixed)):
            raise ValueError(f"fixed: expected {num_tasks} rows of {num_layers} booleans")
        if cfg is not None:  # index 0: execute, 1: skip; equal logits: p(execute) = 0.5 (AdaShare's start)
            self.policy_logits = nn.Parameter(torch.zeros(num_tasks, num_layers, 2))
        self.step, self.total = 0, 1

    def set_step(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    def select_probs(self) -> Tensor:
        """(tasks, layers) probability of executing each layer (fixed policies: 1 or 0)."""
        if self.fixed is not None:
            return torch.tensor(self.fixed, dtype=torch.float32)
        return torch.softmax(self.policy_logits, dim=-1)[..., 0]

    def learned_mask(self) -> Tensor:
        """(tasks, layers) True where a policy is learning now (the top learned_layers layers, search only)."""
        mask = torch.zeros(self.num_tasks, self.num_layers, dtype=torch.bool)
        if self.fixed is None:
            n = learned_layers(self.step, self.total, self.cfg, self.num_layers)
            if n:
                mask[:, self.num_layers - n:] = True
        return mask.to(self.policy_logits.device) if self.fixed is None else mask

    def gates(self, task: int) -> list[Gate]:
        """Per layer of this task: True / False (execute / skip) or a soft execute weight (training, learned)."""
        if self.fixed is not None:
            return list(self.fixed[task])
        n = learned_layers(self.step, self.total, self.cfg, self.num_layers)
        first = self.num_layers - n
        if not self.training:  # validation: the policy's most probable choice
            probs = self.select_probs()[task].detach()
            return [True if layer < first else bool(probs[layer] >= 0.5) for layer in range(self.num_layers)]
        noise = gumbel_noise((self.num_layers, 2))  # every layer, every pass: the RNG advances the same way
        if n == 0:
            return [True] * self.num_layers
        soft = gumbel_softmax(self.policy_logits[task], temperature(self.step, self.total, self.cfg), noise)
        return [True if layer < first else soft[layer, 0] for layer in range(self.num_layers)]


# ---------------------------------------------------------------- the gated encoder

def gated_bert_forward(bert: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], gates: list[Gate]):
    """A BERT-family encoder (embeddings, layers, pooler) run layer by layer with per-layer gates: a skipped layer
    is never executed, a soft one mixes its output with its input. Returns (last hidden state, pooled output).

    It repeats what BertModel.forward does for an encoder-only model (embeddings, the attention mask transformers
    builds, each layer, the pooler); tests/finetune/test_adashare.py checks that all-True gates equal BertModel exactly."""
    embedded = bert.embeddings(input_ids=input_ids)
    mask, _ = bert._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                           embedding_output=embedded, encoder_hidden_states=None, past_key_values=None)
    hidden = embedded
    for layer, gate in zip(bert.encoder.layer, gates):
        if gate is False:
            continue
        out = layer(hidden, mask)
        hidden = out if gate is True else gate.to(out.dtype) * out + (1 - gate.to(out.dtype)) * hidden
    pooled = bert.pooler(hidden) if getattr(bert, "pooler", None) is not None else None
    return hidden, pooled


def keep_layers(bert: nn.Module, executed: list[bool]) -> None:
    """Drop the skipped layers from an encoder in place, so it executes (and stores) only the selected ones."""
    bert.encoder.layer = nn.ModuleList([layer for layer, keep in zip(bert.encoder.layer, executed) if keep])
    bert.config.num_hidden_layers = len(bert.encoder.layer)
