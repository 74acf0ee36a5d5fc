"""Objective planning: for one registered loss, under what a stage offers, the scope it is evaluated at,
its sites (layer pairs), and a check that every input it needs can be provided, all before any model loads.
The table of inputs itself is kdlib.training.providers. The stages build their Offer from the pieces here
(`layer_offer`, `transfer_set_offer`) and report what does not fit as one field error (`kdlib.errors.fail_field`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import NoReturn

from kdlib.cache.reader import cached_batch_keys
from kdlib.cache.vectors import is_vector_column
from kdlib.errors import fail_field
from kdlib.losses import get_spec
from kdlib.training.providers import (ALL_LAYERS, ATTENTION_PAIR, BATCH, CHAIN, EMBEDDING, PAIR, PROVIDERS, STACKED,
                                      Offer, Site, StepInputs)


_SCOPE_ORDER = (BATCH, PAIR, ATTENTION_PAIR, EMBEDDING, STACKED, CHAIN, ALL_LAYERS)


def _widest(scopes: set[str], loss: str) -> str:
    layered = scopes - {BATCH}
    if len(layered) > 1:
        raise ValueError(f"loss {loss!r} mixes input scopes {sorted(layered)}; one loss reads one kind of layer site")
    return layered.pop() if layered else BATCH


@dataclass
class ObjectivePlan:
    """How one objective gets its inputs: names, scope, and the sites it is evaluated at."""

    name: str
    inputs: list[str]  # the loss's runtime parameters that a provider fills
    scope: str
    sites: list[Site] = field(default_factory=list)

    def teacher_layers(self) -> list[int]:
        layers = {t for s in self.sites for t in ([t for t, _ in s.pairs] if s.pairs else [s.teacher_layer])}
        return sorted(layers)


def _sites(scope: str, offer: Offer, group: str) -> list[Site]:
    pairs = tuple(offer.pairs)
    if scope == BATCH:
        return [Site(projection_group=group)]
    if scope == PAIR:
        return [Site(t, s, projection_group=group) for t, s in pairs]
    if scope == ATTENTION_PAIR:
        return [Site(t, s) for t, s in pairs if t > 0 and s > 0]
    if scope == EMBEDDING:
        return [Site(0, 0, projection_group="embeddings")]
    if scope == STACKED:
        return [Site(pairs=pairs, projection_group=group)] if pairs else []
    if scope == CHAIN:
        return [Site(pairs=(a, b), projection_group=group) for a, b in zip(pairs, pairs[1:])]
    # ALL_LAYERS: the provider reads every layer; the teacher layers listed here are for availability checks
    return [Site(pairs=tuple((t, 0) for t in range(1, offer.teacher_layers + 1)), projection_group=group)]


_SITE_HINT = {PAIR: "a layer map with at least one pair (e.g. layer_map: {name: uniform})",
              ATTENTION_PAIR: "a layer map with a pair of transformer layers (>= 1)",
              STACKED: "a layer map with at least one pair", CHAIN: "a layer map with at least two pairs",
              ALL_LAYERS: "layer_map: {name: emd}"}


def plan_objective(name: str, offer: Offer) -> ObjectivePlan:
    """The plan for loss `name` under what the stage offers; ValueError saying what is missing and where
    it could come from."""
    spec = get_spec(name)
    params = inspect.signature(spec.fn).parameters
    inputs = spec.inputs()
    unknown = [i for i in inputs if i not in PROVIDERS]
    if unknown:
        raise ValueError(f"loss {name!r} asks for {unknown}, which no provider in kdlib.training.providers makes")
    scope = _widest({PROVIDERS[i].scope for i in inputs}, name)
    group = "embeddings" if "student_embeddings" in inputs else "hidden"
    if scope in (PAIR, ATTENTION_PAIR, STACKED, CHAIN) and offer.emd:
        raise ValueError(f"{name} reads fixed layer pairs, but layer_map emd has none; with emd use bert_emd")
    sites = _sites(scope, offer, group)
    if not sites:
        raise ValueError(f"{name} needs {_SITE_HINT[scope]}; got pairs {list(offer.pairs)}")
    plan = ObjectivePlan(name, inputs, scope, sites)
    layers = plan.teacher_layers()
    for input_name in inputs:
        if params[input_name].default is not inspect.Parameter.empty and input_name != "projection":
            continue  # optional inputs are left to the loss's default
        problem = PROVIDERS[input_name].available(offer, layers)
        if problem:
            raise ValueError(f"{name} needs {PROVIDERS[input_name].what} ({input_name}): {problem}")
    return plan


def reads(plans: list[ObjectivePlan], side: str) -> frozenset:
    """Union of what the plans read from the student (side="student") or the online teacher ("teacher")."""
    out: set[str] = set()
    for plan in plans:
        for i in plan.inputs:
            out |= getattr(PROVIDERS[i], f"{side}_reads")
    return frozenset(out)


def projection_groups(plans: list[ObjectivePlan]) -> list[str]:
    """Projections the objectives can use ("hidden", "embeddings"); built only when widths differ."""
    return sorted({site.projection_group for p in plans if "projection" in p.inputs or p.scope == ALL_LAYERS
                   for site in p.sites})


def gather(plan: ObjectivePlan, site: Site, x: StepInputs) -> dict:
    """The loss's keyword inputs at one site."""
    return {name: PROVIDERS[name].get(x, site) for name in plan.inputs}


def cached_reads(plans: list[ObjectivePlan], offer: Offer) -> frozenset:
    """The cached batch keys these plans can read, so a reader decodes only those columns: every small key
    the transfer set has (top-k, logits, pooled, labels), and of the per-position vectors (hidden_<l>,
    query/key/value_<l>, the bulk of a set caching intermediate targets) only the mapped teacher layers
    of the plans that read that kind from the teacher."""
    keep = {key for key in offer.cached if not is_vector_column(key.removeprefix("teacher_"))}
    if offer.online_teacher:
        return frozenset(keep)
    for plan in plans:
        kinds = set()
        for name in plan.inputs:
            kinds |= PROVIDERS[name].teacher_reads
        if plan.scope == BATCH or not kinds:
            continue
        layers = plan.teacher_layers()
        parts = (["hidden"] if "hidden" in kinds else []) + (["query", "key", "value"] if "qkv" in kinds else [])
        keep |= {f"teacher_{part}_{t}" for t in layers for part in parts} & offer.cached
    return frozenset(keep)


def fail_objective(source: str, err: ValueError, prefix: str = "") -> NoReturn:
    """A planning error ("objectives[i]: what is missing") as the field error of that objective under `prefix`."""
    where, _, message = str(err).partition(": ")
    fail_field(source, f"{prefix}{where}", message)


def layer_offer(layer_map, teacher_layers: int, student_layers: int, *, teacher_heads: int = 0,
                student_heads: int = 0) -> dict:
    """The Offer fields that describe the two models' layers: the layer map's fixed (teacher, student) pairs (none
    without a map, or with emd, which weighs every layer against every layer), emd, the layer and head counts.
    ValueError (the map's) when the map does not fit the layer counts."""
    emd = layer_map is not None and layer_map.name == "emd"
    pairs = tuple(layer_map.build(teacher_layers, student_layers)) if layer_map is not None and not emd else ()
    return dict(pairs=pairs, emd=emd, teacher_layers=teacher_layers, student_layers=student_layers,
                teacher_heads=teacher_heads, student_heads=student_heads)


def transfer_set_offer(manifest) -> tuple[frozenset, str]:
    """What a transfer set gives the losses: the batch keys it fills and how its sentence embeddings were pooled."""
    return frozenset(cached_batch_keys(manifest)), manifest.cached.get("pooled") or "mean"
