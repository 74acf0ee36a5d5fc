"""Loss inputs by declaration: one table maps every input name a registered loss can ask for to the
provider that computes it.

A loss's signature is its request (`LossSpec.inputs()`): `hidden_mse(student_hidden, teacher_hidden,
mask, projection=None)` needs hidden states, so the student runs with `output_hidden_states`, and the
teacher's come from the online teacher or from the transfer set's `hidden_<l>` columns. Each provider
says
  * its scope: computed once per batch, or per mapped (teacher, student) layer pair, or over all pairs;
  * what it reads from the student (`student_reads`), so the forward pass captures only that;
  * where its value can come from (`available`): None when the stage offers it, else a sentence
    saying what to change, which validation puts into the error.
Adding a loss is one function and one registry line; no stage dispatches on loss names. How the table is
used for one objective (its sites, its checks) is kdlib.training.objective_plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from kdlib.cache.vectors import vector_column
from kdlib.losses import hidden_mse
from kdlib.training.internals import AttentionViews

# Scopes, from the narrowest: how often a loss is evaluated per batch and which layers it sees.
BATCH = "batch"  # once per batch
PAIR = "pair"  # once per mapped (teacher, student) layer pair; the mean is the objective
ATTENTION_PAIR = "attention_pair"  # per mapped pair of transformer layers (>= 1): attention has no layer 0
EMBEDDING = "embedding"  # the embedding outputs (layer 0 of both models)
STACKED = "stacked"  # once, with the mapped layers stacked (B, L, D) (BERT-PKD)
CHAIN = "chain"  # per consecutive two mapped pairs: a flow between two layers (FSP)
ALL_LAYERS = "all_layers"  # every teacher layer against every student layer (BERT-EMD)


@dataclass(frozen=True)
class Offer:
    """What a stage can give its losses, known before any process group starts."""

    online_teacher: bool  # the frozen teacher runs on every batch
    cached: frozenset  # batch keys the transfer set fills: topk_ids, teacher_lse, mlm_labels, teacher_hidden_<l>, ...
    pairs: tuple = ()  # the fixed layer map, (teacher layer, student layer); () without one
    emd: bool = False  # layer_map emd: every layer against every layer, weights learned (BERT-EMD)
    teacher_layers: int = 0
    student_layers: int = 0
    peer: bool = False  # the stage can build a second student (deep mutual learning)
    token_level: bool = True  # outputs per position (masked LM); False: one per sequence (classifier)
    pooling: str = "mean"  # how sentence embeddings are pooled (the cache's setting when it has them)
    student_heads: int = 0  # attention heads (0: not checked)
    teacher_heads: int = 0
    causal: bool = False  # causal LMs: every position predicts the next token (next_token_labels)
    policies: bool = False  # the student learns AdaShare layer policies (select_probs, policy_mask)


@dataclass
class Site:
    """Where one evaluation of a loss looks: a layer pair, the pairs in order, or nothing in particular."""

    teacher_layer: int = 0
    student_layer: int = 0
    pairs: tuple = ()
    projection_group: str = "hidden"  # which learned projection bridges widths here: hidden or embeddings


class StepInputs:
    """What providers read during one micro-batch: the batch, the models' views, the trainer's state."""

    def __init__(self, batch: dict, offer: Offer, *, student, teacher=None, peer=None, projections=None, emd=None,
                 step: int = 0, total_steps: int = 1, model=None):
        self.batch, self.offer = batch, offer
        self.model = model  # the student module itself (its learned AdaShare policies), beside its outputs' view
        self.student, self.teacher, self.peer = student, teacher, peer
        self.projections, self.emd = projections if projections is not None else {}, emd
        self.step, self.total_steps = step, total_steps
        self.memo: dict[str, Any] = {}  # values shared by several providers within this micro-batch


@dataclass(frozen=True)
class Provider:
    scope: str
    get: Callable[[StepInputs, Site], Any]
    available: Callable[[Offer, list[int]], Optional[str]] = lambda offer, layers: None
    student_reads: frozenset = frozenset()  # "hidden", "qkv", "logits", "peer"
    teacher_reads: frozenset = frozenset()  # what the ONLINE teacher must return: "hidden", "qkv", "logits"
    what: str = ""  # words for error messages


# ---------------------------------------------------------------- availability checks

def _same_heads(offer: Offer, layers: list[int]) -> Optional[str]:
    if offer.student_heads == offer.teacher_heads or not (offer.student_heads and offer.teacher_heads):
        return None
    return (f"it compares attention heads one to one, so the student needs the teacher's {offer.teacher_heads} "
            f"heads, got {offer.student_heads} (student.num_attention_heads)")


def _all(*checks: Callable) -> Callable:
    def check(offer: Offer, layers: list[int]) -> Optional[str]:
        return next((problem for c in checks if (problem := c(offer, layers))), None)
    return check


def _cached(*keys: str, how: str) -> Callable:
    def check(offer: Offer, layers: list[int]) -> Optional[str]:
        return None if set(keys) <= offer.cached else f"the transfer set lacks it: {how}"
    return check


def _teacher_hidden_check(offer: Offer, layers: list[int]) -> Optional[str]:
    missing = [t for t in layers if f"teacher_hidden_{t}" not in offer.cached]
    if offer.online_teacher or not missing:
        return None
    return (f"set online_teacher: true, or make the transfer set with teacher_outputs.hidden_layers "
            f"including {missing}")


def _teacher_qkv_check(parts: tuple[str, ...]) -> Callable:
    """Q/K/V (or what is computed from them) of the mapped teacher layers: online, or cached per layer."""
    def check(offer: Offer, layers: list[int]) -> Optional[str]:
        missing = sorted({t for t in layers for part in parts if f"teacher_{part}_{t}" not in offer.cached})
        if offer.online_teacher or not missing:
            return None
        return (f"set online_teacher: true, or make the transfer set with teacher_outputs.qkv_layers "
                f"including {missing}")
    return check


def _either(online_or_cache_key: str, how: str) -> Callable:
    def check(offer: Offer, layers: list[int]) -> Optional[str]:
        if offer.online_teacher or online_or_cache_key in offer.cached:
            return None
        return f"set online_teacher: true, or {how}"
    return check


def _labels_check(offer: Offer, layers: list[int]) -> Optional[str]:
    if "labels" in offer.cached or "mlm_labels" in offer.cached:
        return None
    return "the transfer set has neither task labels nor masked-LM positions (mlm_positions)"


def _causal_check(offer: Offer, layers: list[int]) -> Optional[str]:
    return None if offer.causal else ("next-token targets need a causal_lm teacher and student (teacher.task: "
                                      "causal_lm); a masked LM predicts its masked positions (mlm_ce)")


def _peer_check(offer: Offer, layers: list[int]) -> Optional[str]:
    return None if offer.peer else "this stage cannot train a second student"


def _policy_check(offer: Offer, layers: list[int]) -> Optional[str]:
    return None if offer.policies else ("it regularises learned layer policies: a multi-task run with "
                                        "multitask.adashare.enabled adds it to its policy search itself")


def _emd_check(offer: Offer, layers: list[int]) -> Optional[str]:
    if not offer.emd:
        return "set layer_map: {name: emd}"
    return _teacher_hidden_check(offer, layers)


# ---------------------------------------------------------------- getters

def _teacher_hidden(x: StepInputs, layer: int) -> Tensor:
    """The online teacher's hidden state when it runs (fp32, exact), else the cached one."""
    if x.teacher is not None:
        return x.teacher.hidden(layer)
    return x.batch[f"teacher_hidden_{layer}"]


def _teacher_views(x: StepInputs):
    """The teacher's attention views: the online teacher's, else built once per micro-batch from the cached
    Q/K/V columns (the same AttentionViews code computes scores, probabilities and per-head values)."""
    if x.teacher is not None:
        return x.teacher.views
    if "teacher_views" not in x.memo:
        qkv: dict[int, dict[str, Tensor]] = {}
        for key, value in x.batch.items():
            column = vector_column(key.removeprefix("teacher_")) if key.startswith("teacher_") else None
            if column is not None and column[0] != "hidden":
                qkv.setdefault(column[1], {})[column[0]] = value
        x.memo["teacher_views"] = AttentionViews(qkv, x.offer.teacher_heads, x.batch["attention_mask"])
    return x.memo["teacher_views"]


def _teacher_logits(x: StepInputs, site: Site) -> Tensor:
    return x.teacher.logits if x.teacher is not None else x.batch["teacher_logits"]


def _teacher_pooled(x: StepInputs, site: Site) -> Tensor:
    if "teacher_pooled" in x.batch:
        return x.batch["teacher_pooled"]
    return x.teacher.pooled(x.offer.pooling)


def _labels(x: StepInputs, site: Site) -> Tensor:
    return x.batch["labels"] if "labels" in x.batch else x.batch["mlm_labels"]


def _next_token_labels(x: StepInputs, site: Site) -> Tensor:
    """(B, T) the id at t + 1 for position t, -100 where t + 1 is padding or past the row (the last position)."""
    ids, mask = x.batch["input_ids"], x.batch["attention_mask"]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], labels[:, 1:])
    return labels


def _aligned_mask(x: StepInputs, site: Site) -> Tensor:
    """Where the cached teacher targets sit: positions ending an aligned character span when the student has
    its own tokenizer (the loader places the teacher's values there), else every real position."""
    return x.batch["aligned_mask"] if "aligned_mask" in x.batch else x.batch["attention_mask"]


def _mask(x: StepInputs, site: Site) -> Optional[Tensor]:
    return x.batch["attention_mask"] if x.offer.token_level else None


def _projection(x: StepInputs, site: Site):
    return x.projections[site.projection_group] if site.projection_group in x.projections else None


def _stack_cls(view_hidden: Callable[[int], Tensor], layers: list[int]) -> Tensor:
    return torch.stack([view_hidden(layer)[:, 0] for layer in layers], dim=1)  # (B, L, D)


def _layer_cost(x: StepInputs, site: Site) -> Tensor:
    """(M, N) hidden-state MSE of every teacher layer 1..M against every student layer 1..N (BERT-EMD's
    hidden cost), through the hidden projection when widths differ. Computed once per micro-batch."""
    if "layer_cost" not in x.memo:
        from kdlib.students.layer_maps import pairwise_layer_cost  # POT (ot): 2 s to import; only BERT-EMD reads it

        mask, proj = x.batch["attention_mask"], _projection(x, site)
        m, n = x.emd.shape
        x.memo["layer_cost"] = pairwise_layer_cost(
            [_teacher_hidden(x, j) for j in range(1, m + 1)], [x.student.hidden(i) for i in range(1, n + 1)],
            lambda s, t: hidden_mse(s, t, mask, proj))
    return x.memo["layer_cost"]


def _transport_plan(x: StepInputs, site: Site):
    cost = _layer_cost(x, site)
    x.emd.record(cost)
    return x.emd.plan(cost.detach())


_TOPK_HOW = "make it with teacher_outputs.top_k > 0"
_SPARSE_HOW = "make it with teacher_outputs.sampled_tokens > 0 (draws from the teacher; with top_k, a sampled tail)"
_STUDENT_QKV = dict(student_reads=frozenset({"qkv"}))
_STUDENT_HEADS = dict(available=_same_heads, student_reads=frozenset({"qkv"}))


def _teacher_qkv(*parts: str) -> dict:
    return dict(available=_teacher_qkv_check(parts), teacher_reads=frozenset({"qkv"}))


def _teacher_heads(*parts: str) -> dict:
    """Per-head maps (scores, probabilities, values) compare head h of the student with head h of the teacher."""
    return dict(available=_all(_teacher_qkv_check(parts), _same_heads), teacher_reads=frozenset({"qkv"}))

PROVIDERS: dict[str, Provider] = {
    # outputs
    "student_logits": Provider(BATCH, lambda x, s: x.student.loss_logits, student_reads=frozenset({"logits"}),
                               what="student logits"),
    "teacher_logits": Provider(BATCH, _teacher_logits,
                               available=_either("teacher_logits", "make the transfer set with "
                                                 "teacher_outputs.dense_logits: true"),
                               teacher_reads=frozenset({"logits"}), what="dense teacher logits"),
    "topk_ids": Provider(BATCH, lambda x, s: x.batch["topk_ids"], _cached("topk_ids", how=_TOPK_HOW),
                         what="cached top-k ids"),
    "topk_logits": Provider(BATCH, lambda x, s: x.batch["topk_logits"], _cached("topk_logits", how=_TOPK_HOW),
                            what="cached top-k logits"),
    "teacher_lse": Provider(BATCH, lambda x, s: x.batch["teacher_lse"], _cached("teacher_lse", how=_TOPK_HOW),
                            what="cached teacher log-sum-exp"),
    "sparse_ids": Provider(BATCH, lambda x, s: x.batch["sparse_ids"], _cached("sparse_ids", how=_SPARSE_HOW),
                           what="cached sampled teacher ids"),
    "sparse_weights": Provider(BATCH, lambda x, s: x.batch["sparse_weights"],
                               _cached("sparse_weights", how=_SPARSE_HOW), what="cached sampled teacher weights"),
    "labels": Provider(BATCH, _labels, _labels_check, what="labels"),
    "next_token_labels": Provider(BATCH, _next_token_labels, _causal_check, what="next-token targets"),
    "aligned_mask": Provider(BATCH, _aligned_mask, what="the positions holding aligned teacher targets"),
    "mask": Provider(BATCH, _mask, what="attention mask"),
    "logits_a": Provider(BATCH, lambda x, s: x.student.loss_logits, student_reads=frozenset({"logits"}),
                         what="student logits"),
    "logits_b": Provider(BATCH, lambda x, s: x.peer.logits, _peer_check, student_reads=frozenset({"peer"}),
                         what="a peer student's logits"),
    # sentence embeddings
    "student_pooled": Provider(BATCH, lambda x, s: x.student.pooled(x.offer.pooling),
                               student_reads=frozenset({"hidden"}), what="student sentence embeddings"),
    "teacher_pooled": Provider(BATCH, _teacher_pooled,
                               available=_either("teacher_pooled", "make the transfer set with "
                                                 "teacher_outputs.pooled: mean"),
                               teacher_reads=frozenset({"hidden"}), what="teacher sentence embeddings"),
    # hidden states per mapped layer pair
    "student_hidden": Provider(PAIR, lambda x, s: x.student.hidden(s.student_layer),
                               student_reads=frozenset({"hidden"}), what="student hidden states"),
    "teacher_hidden": Provider(PAIR, lambda x, s: _teacher_hidden(x, s.teacher_layer), _teacher_hidden_check,
                               teacher_reads=frozenset({"hidden"}), what="teacher hidden states"),
    "student_embeddings": Provider(EMBEDDING, lambda x, s: x.student.hidden(0), student_reads=frozenset({"hidden"}),
                                   what="student embedding outputs"),
    "teacher_embeddings": Provider(EMBEDDING, lambda x, s: _teacher_hidden(x, 0), _teacher_hidden_check,
                                   teacher_reads=frozenset({"hidden"}), what="teacher embedding outputs"),
    "student_cls": Provider(STACKED, lambda x, s: _stack_cls(x.student.hidden, [p[1] for p in s.pairs]),
                            student_reads=frozenset({"hidden"}), what="student [CLS] states"),
    "teacher_cls": Provider(STACKED, lambda x, s: _stack_cls(lambda t: _teacher_hidden(x, t), [p[0] for p in s.pairs]),
                            _teacher_hidden_check, teacher_reads=frozenset({"hidden"}), what="teacher [CLS] states"),
    "student_first": Provider(CHAIN, lambda x, s: x.student.hidden(s.pairs[0][1]), student_reads=frozenset({"hidden"}),
                              what="student hidden states"),
    "student_second": Provider(CHAIN, lambda x, s: x.student.hidden(s.pairs[1][1]), student_reads=frozenset({"hidden"}),
                               what="student hidden states"),
    "teacher_first": Provider(CHAIN, lambda x, s: _teacher_hidden(x, s.pairs[0][0]), _teacher_hidden_check,
                              teacher_reads=frozenset({"hidden"}), what="teacher hidden states"),
    "teacher_second": Provider(CHAIN, lambda x, s: _teacher_hidden(x, s.pairs[1][0]), _teacher_hidden_check,
                               teacher_reads=frozenset({"hidden"}), what="teacher hidden states"),
    "projection": Provider(BATCH, _projection, what="learned width projection"),
    # attention, per mapped pair of transformer layers
    "student_attention_scores": Provider(ATTENTION_PAIR, lambda x, s: x.student.views.scores(s.student_layer),
                                         **_STUDENT_HEADS, what="student attention scores"),
    "teacher_attention_scores": Provider(ATTENTION_PAIR, lambda x, s: _teacher_views(x).scores(s.teacher_layer),
                                         **_teacher_heads("query", "key"), what="teacher attention scores"),
    "student_attention_probs": Provider(ATTENTION_PAIR, lambda x, s: x.student.views.probs(s.student_layer),
                                        **_STUDENT_HEADS, what="student attention probabilities"),
    "teacher_attention_probs": Provider(ATTENTION_PAIR, lambda x, s: _teacher_views(x).probs(s.teacher_layer),
                                        **_teacher_heads("query", "key"), what="teacher attention probabilities"),
    "student_values": Provider(ATTENTION_PAIR, lambda x, s: x.student.views.values(s.student_layer), **_STUDENT_HEADS,
                               what="student per-head values"),
    "teacher_values": Provider(ATTENTION_PAIR, lambda x, s: _teacher_views(x).values(s.teacher_layer),
                               **_teacher_heads("value"),
                               what="teacher per-head values"),
    "student_query": Provider(ATTENTION_PAIR, lambda x, s: x.student.views.query(s.student_layer), **_STUDENT_QKV,
                              what="student queries"),
    "teacher_query": Provider(ATTENTION_PAIR, lambda x, s: _teacher_views(x).query(s.teacher_layer),
                              **_teacher_qkv("query"),
                              what="teacher queries"),
    "student_key": Provider(ATTENTION_PAIR, lambda x, s: x.student.views.key(s.student_layer), **_STUDENT_QKV,
                            what="student keys"),
    "teacher_key": Provider(ATTENTION_PAIR, lambda x, s: _teacher_views(x).key(s.teacher_layer), **_teacher_qkv("key"),
                            what="teacher keys"),
    "student_value": Provider(ATTENTION_PAIR, lambda x, s: x.student.views.value(s.student_layer), **_STUDENT_QKV,
                              what="student values"),
    "teacher_value": Provider(ATTENTION_PAIR, lambda x, s: _teacher_views(x).value(s.teacher_layer),
                              **_teacher_qkv("value"),
                              what="teacher values"),
    # BERT-EMD: every layer against every layer, the transport plan from the learned layer weights
    "layer_cost": Provider(ALL_LAYERS, _layer_cost, _emd_check, student_reads=frozenset({"hidden"}),
                           teacher_reads=frozenset({"hidden"}), what="the layer-to-layer cost matrix"),
    "transport_plan": Provider(ALL_LAYERS, _transport_plan, _emd_check, what="the EMD transport plan"),
    # AdaShare: the multi-task student's (task, layer) execute probabilities and which of them learn now
    "select_probs": Provider(BATCH, lambda x, s: x.model.policies.select_probs(), _policy_check,
                             what="the layer policies' execute probabilities"),
    "policy_mask": Provider(BATCH, lambda x, s: x.model.policies.learned_mask(), _policy_check,
                            what="the policies learning now"),
    # the trainer's clock
    "step": Provider(BATCH, lambda x, s: x.step, what="the step"),
    "total_steps": Provider(BATCH, lambda x, s: x.total_steps, what="the run's steps"),
}
