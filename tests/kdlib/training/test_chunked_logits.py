"""The chunked output layer in training: a DistillModule whose student head is left factored gives the
dense module's loss, parts and gradients (float64, tiny BERT), never creates a (positions x vocabulary)
tensor, computes the projection once for kd_topk + mlm_ce together, and is chosen by engine.chunked_logits."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertForMaskedLM

from kdlib.config import from_dict
from kdlib.training.deepspeed_engine import EngineConfig, logit_chunk_size
from kdlib.errors import ConfigError
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.training.config import math_hash
from kdlib.training.providers import Offer
from kdlib.training.internals import run_model
from kdlib.training.module import DistillModule

B, T, V, H, K = 3, 11, 97, 16, 6
PATHS = {"transfer": "unused", "teacher": "unused"}  # configs only: nothing is loaded
TOPK = frozenset({"topk_ids", "topk_logits", "teacher_lse", "mlm_labels"})


def bert(layers: int, seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config).double()


def batch_from(teacher) -> dict:
    """Ragged rows (padding in 2 of 3), 15-30% masked-LM labels, the teacher's top-k from its own logits."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    labels = torch.full((B, T), -100)
    for (r, c) in [(0, 1), (0, 4), (0, 9), (1, 2), (1, 6), (2, 3)]:
        labels[r, c] = int(ids[r, c])
        ids[r, c] = 4
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=mask).logits
    top = logits.topk(K, dim=-1)
    return {"input_ids": ids, "attention_mask": mask, "mlm_labels": labels, "topk_ids": top.indices,
            "topk_logits": top.values, "teacher_lse": logits.logsumexp(-1)}


OBJECTIVE_SETS = {
    "topk_rest_T2+mlm": ([ObjectiveConfig("kd_topk", params={"temperature": 2.0, "missing_mass": "rest_bucket"}),
                          ObjectiveConfig("mlm_ce", weight=0.5)], False),
    "topk_renorm+mlm+hidden": ([ObjectiveConfig("kd_topk"), ObjectiveConfig("mlm_ce", weight=0.3),
                                ObjectiveConfig("hidden_mse", weight=2.0)], True),
    "online_kl_T3+ce": ([ObjectiveConfig("kd_kl", params={"temperature": 3.0}),
                         ObjectiveConfig("kd_ce", weight=0.25)], True),
    "dense_and_chunked": ([ObjectiveConfig("kd_topk"), ObjectiveConfig("logit_mse", weight=0.1)], True),
}


def module(objectives, online: bool, chunk: int) -> DistillModule:
    offer = Offer(online_teacher=online, cached=TOPK, pairs=((2, 1), (4, 2)), teacher_layers=4, student_layers=2)
    return DistillModule(bert(2, seed=1), objectives, offer, teacher_width=H, seed=0, logit_chunk_size=chunk)


def run(objectives, online: bool, chunk: int):
    teacher = bert(4, seed=0).eval()
    batch = batch_from(teacher)
    m = module(objectives, online, chunk)
    view = run_model(teacher, batch["input_ids"], batch["attention_mask"], hidden=True, qkv=False, heads=4,
                     logits=m.teacher_reads_logits()) if online else None  # as pretrain's online teacher runs
    total, parts = m(batch, view)
    grads = torch.autograd.grad(total, [p for p in m.parameters() if p.requires_grad])
    return total, parts, grads


def close(a, b, scale=1e-11):
    """Absolute tolerance from the reference's magnitude (float64 throughout)."""
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=0,
                               atol=scale * (1.0 + b.detach().abs().max().item()))


@pytest.mark.parametrize("chunk", [4, 7, 256])
@pytest.mark.parametrize("name", list(OBJECTIVE_SETS))
def test_factored_module_equals_dense_module(name, chunk):
    objectives, online = OBJECTIVE_SETS[name]
    total, parts, grads = run(objectives, online, chunk)
    want_total, want_parts, want_grads = run(objectives, online, 0)
    close(total, want_total)
    assert list(parts) == list(want_parts) == [o.name for o in objectives]
    for key in parts:
        close(parts[key], want_parts[key])
    assert len(grads) == len(want_grads)
    for got, want in zip(grads, want_grads):
        close(got, want)
    assert want_total.item() > 0 and all(g.abs().max() > 0 for g in want_grads[:3])  # the comparison is not vacuous


def test_student_view_is_factored_only_when_chunking():
    teacher = bert(4, seed=0)
    batch = batch_from(teacher)
    student = bert(2, seed=1)
    dense = run_model(student, batch["input_ids"], batch["attention_mask"], hidden=False, qkv=False, heads=4)
    factored = run_model(student, batch["input_ids"], batch["attention_mask"], hidden=False, qkv=False, heads=4,
                         chunk_size=8)
    assert dense.factored is None and factored.factored is not None
    assert factored.output.logits.shape == (B, 0, V)  # the model never projected
    close(factored.logits, dense.logits)  # a loss without a twin still gets the exact dense logits


def test_online_teacher_skips_its_output_projection_when_no_objective_reads_its_logits():
    teacher = bert(4, seed=0)
    batch = batch_from(teacher)
    reads = {name: module(OBJECTIVE_SETS[name][0], True, 0).teacher_reads_logits()
             for name in ("topk_renorm+mlm+hidden", "online_kl_T3+ce")}
    assert reads == {"topk_renorm+mlm+hidden": False, "online_kl_T3+ce": True}
    full = run_model(teacher, batch["input_ids"], batch["attention_mask"], hidden=True, qkv=False, heads=4)
    trunk = run_model(teacher, batch["input_ids"], batch["attention_mask"], hidden=True, qkv=False, heads=4,
                      logits=False)
    assert trunk.output.logits.shape == (B, 0, V)
    for layer in range(5):
        torch.testing.assert_close(trunk.hidden(layer), full.hidden(layer), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="without its output projection"):
        trunk.logits


class _Recorder(TorchDispatchMode):
    """The largest tensor any aten op returns, and the (rows, V) matrix products (projections) it runs."""

    def __init__(self):
        super().__init__()
        self.largest, self.projected_rows = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.dim() == 2 \
                and out.shape[1] == V:
            self.projected_rows += out.shape[0]
        return out


def test_no_positions_by_vocabulary_tensor_and_one_projection_for_kd_and_mlm():
    objectives, _ = OBJECTIVE_SETS["topk_rest_T2+mlm"]
    teacher = bert(4, seed=0)
    batch = batch_from(teacher)
    real = int(batch["attention_mask"].sum())
    chunk = 4
    m = module(objectives, False, chunk)
    with _Recorder() as rec:
        m(batch)[0].backward()
    assert rec.largest <= max(chunk * V, V * H, B * T * 4 * H)  # one chunk of logits, the weight, activations
    assert rec.projected_rows == real  # forward projections: each real position once, shared by both losses
    dense = module(objectives, False, 0)
    with _Recorder() as rec_dense:
        dense(batch)[0].backward()
    assert rec_dense.largest >= B * T * V


def engine(**kw) -> EngineConfig:
    return EngineConfig(**kw)


def test_auto_chunks_only_where_it_pays():
    kd = [ObjectiveConfig("kd_topk"), ObjectiveConfig("mlm_ce")]
    assert logit_chunk_size(engine(), kd) == 256
    assert logit_chunk_size(engine(logit_chunk_size=64), kd) == 64
    assert logit_chunk_size(engine(zero_stage=3), kd) == 0
    assert logit_chunk_size(engine(), kd + [ObjectiveConfig("logit_mse")]) == 0  # dense logits needed anyway
    assert logit_chunk_size(engine(chunked_logits="off"), kd) == 0
    assert logit_chunk_size(engine(chunked_logits="on"), [ObjectiveConfig("hidden_mse")]) == 256


@pytest.mark.parametrize("overrides, message", [
    ({"engine.chunked_logits": "on", "engine.zero_stage": 3}, "field 'engine.chunked_logits': on, but ZeRO-3"),
    ({"engine.chunked_logits": "on", "objectives": [{"name": "kd_topk"}, {"name": "logit_mse"}]},
     "field 'engine.chunked_logits': on, but logit_mse"),
    ({"engine.logit_chunk_size": 0}, "field 'engine.logit_chunk_size': expected a positive integer"),
    ({"engine.chunked_logits": "yes"}, "field 'engine.chunked_logits'"),
])
def test_bad_settings_are_refused_naming_the_file_and_field(tmp_path, overrides, message):
    from kdlib.config import load_config
    from pretrain.config import PretrainConfig
    from tests.transfer_fixture import base_config, write_config

    path = write_config(base_config(PATHS, tmp_path / "run", **overrides), tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, PretrainConfig)
    assert "bad.yaml" in str(err.value)


def test_chunking_settings_do_not_change_the_math_hash(tmp_path):
    from pretrain.config import PretrainConfig
    from tests.transfer_fixture import base_config

    hashes = {math_hash(from_dict(PretrainConfig, base_config(PATHS, tmp_path / "run", **o)))
              for o in ({}, {"engine.chunked_logits": "off"}, {"engine.logit_chunk_size": 64})}
    assert len(hashes) == 1


MASK_2x9 = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
LABELS_2x9 = torch.tensor([[-100, 3, -100, -100, -100, 5, -100, -100, -100], [-100, -100, 40] + [-100] * 6])


def factored_2x9():
    """FactoredLogits over (2, 9) positions (3 of them padding) in float64, with its parameters."""
    from kdlib.losses.chunked import FactoredLogits

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    return FactoredLogits(hidden, weight, bias, 5)


def term_case(kind: str, temperature: float = 1.0, peaked: bool = False, full_k: bool = False):
    """(FactoredLogits, a twin's ChunkTerm). peaked: the cached ids are the student's own top ids and its
    logits are scaled up, so it keeps < 1% outside K (kd_topk's exact rest path); full_k: k = V."""
    from kdlib.losses.chunked_twins import kd_kl_chunked, kd_topk_chunked, mlm_ce_chunked

    logits = factored_2x9()
    teacher = torch.randn(2, 9, V, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 3
    if kind == "kl":
        return logits, kd_kl_chunked(logits, teacher, MASK_2x9, temperature=temperature)
    if kind == "mlm":
        return logits, mlm_ce_chunked(logits, LABELS_2x9, MASK_2x9)
    if kind == "sparse":  # 4 sampled ids per position, the last one padding (weight 0, a repeated id)
        from kdlib.losses.chunked_twins import kd_sparse_chunked

        ids = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i))[:4] for i in range(18)])
        ids = ids.reshape(2, 9, 4)
        ids[..., 3] = ids[..., 0]
        weights = torch.rand(2, 9, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        weights[..., 3] = 0
        return logits, kd_sparse_chunked(logits, ids, weights / weights.sum(-1, keepdim=True), MASK_2x9)
    if peaked:
        with torch.no_grad():
            logits.weight.mul_(6.0)
    ids = (logits.dense().detach() if peaked else teacher).topk(V if full_k else K, dim=-1).indices
    return logits, kd_topk_chunked(logits, ids, teacher.gather(-1, ids), teacher.logsumexp(-1), MASK_2x9,
                                   temperature=temperature, missing_mass=kind)


@pytest.mark.parametrize("kind, temperature, peaked, full_k", [
    ("rest_bucket", 1.0, False, False), ("rest_bucket", 2.5, False, False), ("rest_bucket", 1.0, True, False),
    ("rest_bucket", 2.5, True, False), ("renormalize", 1.0, False, False), ("renormalize", 0.5, True, False),
    ("rest_bucket", 2.0, False, True), ("renormalize", 2.0, False, True), ("kl", 3.0, False, False),
    ("mlm", 1.0, False, False), ("sparse", 1.0, False, False)])
def test_closed_form_gradients_equal_autograd_through_the_loss(kind, temperature, peaked, full_k):
    """The twins' value_and_grad against autograd through the same per-position loss (the traced path)."""
    from dataclasses import replace

    from kdlib.losses.chunked import fused_loss

    logits, term = term_case(kind, temperature, peaked, full_k)
    if peaked:  # the fixture does reach kd_topk's exact rest path (student rest mass < 1e-2) at some rows
        q = torch.softmax(logits.dense().detach() / temperature, -1)[MASK_2x9.bool()]
        assert bool((1 - q.topk(K, -1).values.sum(-1) < 1e-2).any())
    params = [logits.hidden, logits.weight, logits.bias]
    closed = fused_loss(logits, [term], [1.3])[0]
    traced = fused_loss(logits, [replace(term, value_and_grad=None)], [1.3])[0]
    close(closed, traced)
    for a, b in zip(torch.autograd.grad(closed, params), torch.autograd.grad(traced, params)):
        close(a, b)
        assert b.abs().max() > 0


def test_closed_form_and_traced_terms_mix_in_one_pass():
    from dataclasses import replace

    from kdlib.losses.chunked import fused_loss
    from kdlib.losses.chunked_twins import mlm_ce_chunked

    logits, topk = term_case("rest_bucket", 2.0)
    mlm = mlm_ce_chunked(logits, LABELS_2x9, MASK_2x9)
    params = [logits.hidden, logits.weight, logits.bias]
    both, values = fused_loss(logits, [topk, replace(mlm, value_and_grad=None)], [1.0, 0.4])
    alone = [fused_loss(logits, [t], [1.0]) for t in (topk, mlm)]
    close(values, torch.cat([alone[0][1], alone[1][1]]))
    want = torch.autograd.grad(alone[0][0] + 0.4 * alone[1][0], params)
    for a, b in zip(torch.autograd.grad(both, params), want):
        close(a, b)


def test_bf16_student_trains_through_the_chunked_path_like_the_dense_one():
    """Mixed precision: bf16 weights and activations, fp32 losses; the chunked gradient accumulates the
    weight gradient in fp32, so it may differ from the dense bf16 one by bf16 rounding (2^-8 relative)."""
    objectives, _ = OBJECTIVE_SETS["topk_rest_T2+mlm"]
    teacher = bert(4, seed=0)
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch_from(teacher).items()}  # as cached
    results = []
    for chunk in (0, 5):
        m = module(objectives, False, chunk).to(torch.bfloat16)
        total, parts = m(batch)
        assert total.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())
        results.append((total, torch.autograd.grad(total, [p for p in m.parameters() if p.requires_grad])))
    (chunked, g_chunked), (dense, g_dense) = results
    close(chunked, dense, scale=1e-5)  # same bf16 logits, same fp32 loss math
    for a, b in zip(g_chunked, g_dense):
        assert a.dtype == b.dtype == torch.bfloat16
        bound = 2 ** -8 * 8 * (b.float().abs().max().item() + 1e-30)  # a few bf16 ulps of the largest entry
        assert (a.float() - b.float()).abs().max().item() <= bound
