"""The module DeepSpeed trains: the student, its learned projections (and a peer student for mutual
learning), and the weighted objectives, each fed by the input providers of `kdlib.training.providers`.

Projections and the peer live in this module (not beside it) so that DeepSpeed's optimizer, ZeRO
partitioning and checkpoints treat them like any other trained weight; exports keep `student.*` only.
`forward` returns the total loss and each weighted objective separately, for logging. Loss-side state
that is not a weight (BERT-EMD's layer weights) is JSON, carried in the trainer's checkpoint state.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from kdlib.losses import make_projection
from kdlib.losses.chunked import fused_loss
from kdlib.losses.objectives import ObjectiveConfig, chunk_term, evaluate_objective
from kdlib.training.progressive import ProgressiveTransfer
from kdlib.training.objective_plan import ObjectivePlan, gather, plan_objective, projection_groups, reads
from kdlib.training.providers import ALL_LAYERS, Offer, StepInputs
from kdlib.training.internals import ModelView, run_model


class EmdState:
    """BERT-EMD layer weights while training. Every micro-batch transports with the current weights; once
    per optimizer step the weights are updated from the cost averaged over micro-batches AND ranks (one
    all-reduce, shared with the step's metrics), so every rank holds the same weights."""

    def __init__(self, teacher_layers: int, student_layers: int, temperature: float):
        from kdlib.students.layer_maps import EmdLayerWeights  # imports POT (~5 s): only BERT-EMD runs need it

        self.weights = EmdLayerWeights(teacher_layers, student_layers, temperature=temperature)
        self._sum = torch.zeros(teacher_layers * student_layers, dtype=torch.float64)
        self._count = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.weights.shape

    def plan(self, cost: Tensor):
        return self.weights.plan(cost)

    def record(self, cost: Tensor) -> None:
        self._sum += cost.detach().double().cpu().flatten()  # EMD runs on the host anyway (POT)
        self._count += 1

    def statistics(self) -> Tensor:
        """This rank's summed cost and count, to be summed over ranks."""
        return torch.cat([self._sum, torch.tensor([float(self._count)], dtype=torch.float64)])

    def finish_step(self, summed: Tensor) -> None:
        count = float(summed[-1])
        if count > 0:
            cost = (summed[:-1] / count).reshape(self.shape).numpy()
            self.weights.update(cost, self.weights.plan(cost))
        self._sum.zero_()
        self._count = 0

    def state_dict(self) -> dict:
        return {"teacher_weights": self.weights.teacher_weights.tolist(),
                "student_weights": self.weights.student_weights.tolist()}  # JSON floats round-trip float64 exactly

    def load_state_dict(self, state: dict) -> None:
        self.weights.teacher_weights = np.asarray(state["teacher_weights"], dtype=np.float64)
        self.weights.student_weights = np.asarray(state["student_weights"], dtype=np.float64)


def make_projections(student_width: int, teacher_width: int, names: list[str], seed: int) -> nn.ModuleDict:
    """Learned student->teacher width projections (TinyBERT's W_h, W_e), one per name; empty when widths match."""
    if student_width == teacher_width or not names:
        return nn.ModuleDict()
    torch.manual_seed(seed + 1)
    return nn.ModuleDict({name: make_projection(student_width, teacher_width) for name in names})


def plan_objectives(objectives: list[ObjectiveConfig], offer: Offer) -> list[ObjectivePlan]:
    """Plans for every objective; ValueError naming the objective index, what it misses and where to get it."""
    plans = []
    for i, obj in enumerate(objectives):
        try:
            plans.append(plan_objective(obj.name, offer))
        except ValueError as err:
            raise ValueError(f"objectives[{i}]: {err}") from None
    return plans


def objective_terms(objectives: list, plans: list, x: StepInputs, factored, step: int, total_steps: int, *,
                    sites_of: Optional[Callable] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, {objective: weighted value}) of one step: each objective's inputs gathered at its sites (`sites_of`:
    the sites a progressive stage keeps; none -> a zero term), output losses on `factored` logits evaluated in one
    chunked pass. The training core and the Python API (kdlib.api.Distillation) both compute a step's loss here."""
    parts: dict[str, Tensor] = {}
    fused = []  # (name, weight, ChunkTerm): losses on the factored logits, evaluated in one pass below
    for obj, plan in zip(objectives, plans):
        sites = sites_of(plan) if sites_of is not None else plan.sites
        if not sites:  # off in this progressive stage
            parts[obj.name] = torch.zeros((), device=x.batch["input_ids"].device)
            continue
        inputs = [gather(plan, site, x) for site in sites]  # once: some providers record (BERT-EMD's cost)
        if factored is not None and len(sites) == 1:
            deferred = chunk_term(obj, inputs[0], step, total_steps)
            if deferred is not None:
                fused.append((obj.name,) + deferred[:2])
                continue
        values = []
        for site_inputs in inputs:
            value = evaluate_objective(obj, site_inputs, step, total_steps)
            values.append(sum(value) if isinstance(value, tuple) else value)  # dml: both students' losses
        parts[obj.name] = values[0] if len(values) == 1 else torch.stack(values).mean()
    others = [parts[name] for name in parts]
    if fused:  # one projection for kd_topk + mlm_ce; the parts are logged, the total carries the gradient
        chunked, values = fused_loss(factored, [t for _, _, t in fused], [w for _, w, _ in fused])
        for (name, weight, _), value in zip(fused, values):
            parts[name] = (weight * value).to(chunked.dtype)
        others.append(chunked)
    total = torch.stack(others).sum()
    return total, {obj.name: parts[obj.name] for obj in objectives}


class DistillModule(nn.Module):
    """student (+ projections, + peer); forward(batch, teacher view) -> (total loss, {objective: weighted loss})."""

    def __init__(self, student: nn.Module, objectives: list[ObjectiveConfig], offer: Offer, *,
                 teacher_width: int, seed: int, peer_factory: Optional[Callable[[], nn.Module]] = None,
                 emd_temperature: float = 1.0, progressive: Optional[ProgressiveTransfer] = None,
                 logit_chunk_size: int = 0):
        super().__init__()
        self.objectives, self.offer = objectives, offer
        self.plans = plan_objectives(objectives, offer)
        self.student = student
        self.projections = make_projections(student.config.hidden_size, teacher_width, projection_groups(self.plans),
                                            seed)
        wants = reads(self.plans, "student")
        self.peer = peer_factory() if "peer" in wants else None
        self.want_hidden, self.want_qkv = "hidden" in wants, "qkv" in wants
        self.heads = student.config.num_attention_heads
        self.emd = EmdState(offer.teacher_layers, offer.student_layers, emd_temperature) \
            if any(p.scope == ALL_LAYERS for p in self.plans) else None
        self.progressive = progressive  # MobileBERT's layer-by-layer stages (kdlib.training.progressive), or None
        self.logit_chunk_size = logit_chunk_size  # > 0: output losses with chunked twins share one chunked projection
        if progressive is not None:
            progressive.gate_gradients(self, student.config.num_hidden_layers)

    def teacher_needs(self) -> tuple[bool, bool]:
        """(hidden states, Q/K/V) the online teacher must return for these objectives."""
        wants = reads(self.plans, "teacher")
        return "hidden" in wants, "qkv" in wants

    def teacher_reads_logits(self) -> bool:
        """Whether any objective reads the online teacher's logits (else its output projection is skipped)."""
        return "logits" in reads(self.plans, "teacher")

    def forward(self, batch: dict, teacher: Optional[ModelView] = None, step: int = 0, total_steps: int = 1):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if hasattr(self.student, "set_step"):  # a student that changes with progress (BERT-of-Theseus replacement)
            self.student.set_step(step, total_steps)
        if hasattr(self.student, "select"):  # a student that routes by batch (multi-task: the batch's task head)
            self.student.select(batch)
        mine = run_model(self.student, ids, mask, hidden=self.want_hidden, qkv=self.want_qkv, heads=self.heads,
                         chunk_size=self.logit_chunk_size)
        peer = run_model(self.peer, ids, mask, hidden=False, qkv=False, heads=self.heads) if self.peer else None
        x = StepInputs(batch, self.offer, student=mine, teacher=teacher, peer=peer, projections=self.projections,
                       emd=self.emd, step=step, total_steps=total_steps, model=self.student)
        layer = self.progressive.begin(step) if self.progressive is not None else None
        sites_of = (lambda plan: self.progressive.sites(plan, layer)) if self.progressive is not None else None
        return objective_terms(self.objectives, self.plans, x, mine.factored, step, total_steps, sites_of=sites_of)

    # loss-side state: not weights, but part of what a step computes
    def statistics(self) -> Tensor:
        return self.emd.statistics() if self.emd is not None else torch.zeros(0, dtype=torch.float64)

    def finish_step(self, summed: Tensor) -> None:
        if self.emd is not None:
            self.emd.finish_step(summed)

    def loss_state_dict(self) -> dict:
        return {"emd": self.emd.state_dict()} if self.emd is not None else {}

    def load_loss_state_dict(self, state: dict) -> None:
        if self.emd is not None:
            self.emd.load_state_dict(state["emd"])
