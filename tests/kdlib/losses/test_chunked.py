"""Chunked output-layer KD losses against the unchunked losses on hidden @ weight.T + bias (float64):
values and gradients, grad_output scaling, empty inputs, shape errors, and peak memory."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdlib.losses.chunked_twins import chunked_kd_ce, chunked_kd_kl, chunked_kd_topk, chunked_label_ce
from kdlib.losses.output import kd_ce, kd_kl, mlm_ce
from kdlib.losses.topk import kd_topk
from tests.paths import REPO_ROOT

N, H, V, K = 10, 6, 23, 5
PEAKED = [1, 6]  # rows whose student puts > 99% of its mass on the cached ids: kd_topk's exact rest path
IGNORED = [2, 3, 8]
CHUNKS = [5, 3, 1, 64]  # divides N, does not divide N, 1, exceeds N
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROOT = REPO_ROOT


def make(bias=True, dtype=torch.float64, device="cpu", n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    hidden[[i for i in PEAKED if i < n]] *= 8
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    teacher = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    ids = teacher.topk(K, dim=-1).indices
    logits = hidden @ weight.T + (0 if b is None else b)
    peaked = [i for i in PEAKED if i < n]
    ids[peaked] = logits[peaked].topk(K, dim=-1).indices
    labels = torch.randint(0, V, (n,), generator=g)
    labels[[i for i in IGNORED if i < n]] = -100
    d = dict(h=hidden, w=weight, b=b, teacher=teacher, ids=ids, z=teacher.gather(-1, ids),
             lse=teacher.logsumexp(-1), labels=labels)
    d = {key: None if x is None else x.to(device=device, dtype=x.dtype if key in ("ids", "labels") else dtype)
         for key, x in d.items()}
    for key in ("h", "w", "b"):
        if d[key] is not None:
            d[key].requires_grad_(True)
    return SimpleNamespace(**d)


def case(kind, temp=1.0, mm="renormalize"):
    """(chunked(d, chunk_size), reference(d, logits)) for one loss."""
    if kind == "topk":
        return (lambda d, cs: chunked_kd_topk(d.h, d.w, d.b, d.ids, d.z, d.lse, temperature=temp,
                                              missing_mass=mm, chunk_size=cs),
                lambda d, s: kd_topk(s[None], d.ids[None], d.z[None], d.lse[None], None, temperature=temp,
                                     missing_mass=mm))
    if kind in ("kl", "ce"):
        fn, ref = (chunked_kd_kl, kd_kl) if kind == "kl" else (chunked_kd_ce, kd_ce)
        return (lambda d, cs: fn(d.h, d.w, d.b, d.teacher, temperature=temp, chunk_size=cs),
                lambda d, s: ref(s[None], d.teacher[None], None, temperature=temp))
    return (lambda d, cs: chunked_label_ce(d.h, d.w, d.b, d.labels, chunk_size=cs),
            lambda d, s: mlm_ce(s[None], d.labels[None], None))


CASES = {
    "topk_renorm_T1": case("topk", 1.0, "renormalize"), "topk_renorm_T2": case("topk", 2.0, "renormalize"),
    "topk_rest_T1": case("topk", 1.0, "rest_bucket"), "topk_rest_T2": case("topk", 2.0, "rest_bucket"),
    "kl_T1": case("kl", 1.0), "kl_T3": case("kl", 3.0), "ce_T1": case("ce", 1.0), "ce_T3": case("ce", 3.0),
    "label_ce": case("label"),
}


def params(d):
    return [x for x in (d.h, d.w, d.b) if x is not None]


def reference(d, ref):
    s = d.h @ d.w.T + (0 if d.b is None else d.b)
    return ref(d, s)


def assert_close(actual, expected, scale=1e-10):
    """Absolute tolerance from the reference's magnitude (never purely relative near zero)."""
    atol = scale * (1.0 + expected.detach().abs().max().item())
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=0, atol=atol)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("name", list(CASES))
def test_value_and_gradients_match_unchunked(name, chunk, bias):
    chunked, ref = CASES[name]
    d = make(bias)
    got, want = chunked(d, chunk), reference(d, ref)
    assert_close(got, want)
    for g_got, g_want in zip(torch.autograd.grad(got, params(d)), torch.autograd.grad(want, params(d))):
        assert_close(g_got, g_want)


def test_fixture_exercises_the_exact_rest_path_in_some_chunks():
    """kd_topk takes a different code path on rows with student rest mass < 1e-2; both must occur."""
    d = make()
    log_q = torch.log_softmax(d.h @ d.w.T + d.b, -1).detach()
    rest = 1 - log_q.gather(-1, d.ids).exp().sum(-1)
    assert (rest < 1e-2).nonzero().flatten().tolist() == PEAKED


@pytest.mark.parametrize("name", ["topk_rest_T2", "kl_T3", "ce_T1", "label_ce"])
def test_grad_output_scales_gradients(name):
    chunked, ref = CASES[name]
    d = make()
    got = torch.autograd.grad(chunked(d, 3) * 3.7, params(d))
    want = torch.autograd.grad(reference(d, ref), params(d))
    for g_got, g_want in zip(got, want):
        assert_close(g_got, 3.7 * g_want)


def test_frozen_projection_and_no_grad():
    chunked, ref = CASES["topk_rest_T1"]
    d = make()
    d.w.requires_grad_(False)
    d.b.requires_grad_(False)
    got, want = chunked(d, 4), reference(d, ref)
    assert_close(torch.autograd.grad(got, d.h)[0], torch.autograd.grad(want, d.h)[0])
    with torch.no_grad():
        value = chunked(d, 4)
    assert value.grad_fn is None and not value.requires_grad
    assert_close(value, want)


def test_teacher_tensors_get_no_gradient():
    d = make()
    for x in (d.teacher, d.z, d.lse):
        x.requires_grad_(True)
    loss = (chunked_kd_topk(d.h, d.w, d.b, d.ids, d.z, d.lse, missing_mass="rest_bucket", chunk_size=3)
            + chunked_kd_kl(d.h, d.w, d.b, d.teacher, temperature=2.0, chunk_size=3))
    loss.backward()
    assert d.teacher.grad is None and d.z.grad is None and d.lse.grad is None
    assert d.h.grad is not None and d.w.grad is not None and d.b.grad is not None


@pytest.mark.parametrize("name", list(CASES))
def test_empty_input_gives_zero_loss_and_zero_gradients(name):
    chunked, _ = CASES[name]
    d = make(n=0)
    loss = chunked(d, 4)
    assert loss.item() == 0.0 and loss.requires_grad
    for g, x in zip(torch.autograd.grad(loss, params(d)), params(d)):
        assert g.shape == x.shape and not bool(g.any())


def test_all_ignored_labels_give_zero():
    d = make()
    d.labels.fill_(-100)
    loss = chunked_label_ce(d.h, d.w, d.b, d.labels, chunk_size=3)
    assert loss.item() == 0.0
    assert all(not bool(g.any()) for g in torch.autograd.grad(loss, params(d)))
    assert_close(loss, mlm_ce((d.h @ d.w.T + d.b)[None], d.labels[None], None))


@pytest.mark.parametrize("call, arg", [
    (lambda d: chunked_kd_kl(d.h[0], d.w, d.b, d.teacher), "hidden"),
    (lambda d: chunked_kd_kl(d.h, d.w[:, :3], d.b, d.teacher), "weight"),
    (lambda d: chunked_kd_kl(d.h, d.w.float(), d.b, d.teacher), "weight"),
    (lambda d: chunked_kd_kl(d.h, d.w, d.b[:4], d.teacher), "bias"),
    (lambda d: chunked_kd_kl(d.h, d.w, d.b, d.teacher[:, :4]), "teacher_logits"),
    (lambda d: chunked_kd_ce(d.h, d.w, d.b, d.teacher[:4]), "teacher_logits"),
    (lambda d: chunked_kd_kl(d.h, d.w, d.b, d.teacher, chunk_size=0), "chunk_size"),
    (lambda d: chunked_kd_kl(d.h, d.w, d.b, d.teacher, temperature=0.0), "temperature"),
    (lambda d: chunked_kd_topk(d.h, d.w, d.b, d.ids[:4], d.z, d.lse), "topk_ids"),
    (lambda d: chunked_kd_topk(d.h, d.w, d.b, d.ids, d.z[:, :2], d.lse), "topk_logits"),
    (lambda d: chunked_kd_topk(d.h, d.w, d.b, d.ids, d.z, d.lse[:4]), "teacher_lse"),
    (lambda d: chunked_kd_topk(d.h, d.w, d.b, d.ids + V, d.z, d.lse), "topk_ids"),
    (lambda d: chunked_kd_topk(d.h, d.w, d.b, d.ids, d.z, d.lse, missing_mass="drop"), "missing_mass"),
    (lambda d: chunked_label_ce(d.h, d.w, d.b, d.labels[:4]), "labels"),
    (lambda d: chunked_label_ce(d.h, d.w, d.b, d.labels.clamp(min=0) + V), "labels"),
])
def test_bad_input_raises_naming_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"^{arg}: expected"):
        call(make())


def test_double_backward_is_refused():
    d = make()
    loss = chunked_kd_kl(d.h, d.w, d.b, d.teacher, chunk_size=3)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, d.h, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["topk_renorm_T2", "topk_rest_T1", "kl_T3", "label_ce"])
def test_dtypes_and_devices(name, dtype, device):
    chunked, ref = CASES[name]
    d = make(dtype=dtype, device=device)
    got, want = chunked(d, 3), reference(d, ref)
    scale = 1e-5 if dtype == torch.float32 else 1e-10
    assert got.dtype == dtype and got.device.type == device
    assert_close(got, want, scale)
    for g_got, g_want in zip(torch.autograd.grad(got, params(d)), torch.autograd.grad(want, params(d))):
        assert_close(g_got, g_want, scale)


class _LargestOutput(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("mm", ["renormalize", "rest_bucket"])
def test_no_tensor_larger_than_one_chunk_of_logits(mm):
    """Deterministic companion of the RSS check: nothing bigger than chunk_size x V is ever created
    (H < chunk_size, so the (V, H) weight gradient is below the bound); the dense path exceeds it."""
    n, v, h, k, cs = 96, 1000, 8, 4, 16
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(n, h, generator=g, requires_grad=True), torch.randn(v, h, generator=g)
    weight.requires_grad_(True)
    bias = torch.zeros(v, requires_grad=True)
    ids = torch.randint(0, v, (n, k), generator=g)
    z = torch.randn(n, k, generator=g) + 6
    lse = z.logsumexp(-1) + 1
    with _LargestOutput() as rec:
        chunked_kd_topk(hidden, weight, bias, ids, z, lse, missing_mass=mm, chunk_size=cs).backward()
    assert 0 < rec.largest <= cs * v
    with _LargestOutput() as dense:
        kd_topk((hidden @ weight.T + bias)[None], ids[None], z[None], lse[None], None, missing_mass=mm).backward()
    assert dense.largest >= n * v


MEMORY_SCRIPT = """
import sys, torch
from kdlib.runtime.speed import resident_peak_kib
from kdlib.losses.chunked_twins import chunked_kd_topk
from kdlib.losses.topk import kd_topk
N, H, V, K, CHUNK = 2048, 32, 30522, 8, 256
g = torch.Generator().manual_seed(0)
h = torch.randn(N, H, generator=g, requires_grad=True)
W = (torch.randn(V, H, generator=g) * 0.1).requires_grad_()
b = torch.zeros(V, requires_grad=True)
z = torch.randn(N, K, generator=g) + 5
ids = torch.randint(0, V, (N, K), generator=g)
lse = z.logsumexp(-1) + 1
def step(n, v, chunked):
    i = ids[:n] % v
    if chunked:
        return chunked_kd_topk(h[:n], W[:v], b[:v], i, z[:n], lse[:n], chunk_size=CHUNK)
    return kd_topk((h[:n] @ W[:v].T + b[:v])[None], i[None], z[:n][None], lse[:n][None], None)
chunked = sys.argv[1] == "chunked"
step(4, 64, chunked).backward()  # one-time allocations (thread pools, dispatch caches) before the baseline
before = resident_peak_kib()
step(N, V, chunked).backward()
print(resident_peak_kib() - before)
"""


def _peak_increase_kib(path: str) -> int:
    # A fixed mmap threshold makes glibc return every large block to the OS on free, so the resident peak
    # follows the live tensors instead of heap fragmentation.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, path], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_chunked_peak_memory_is_below_half_of_unchunked():
    """V=30522, H=32, N=2048, chunk 256, float32: peak RSS increase of forward+backward (VmHWM, KiB)."""
    logits_kib = 2048 * 30522 * 4 // 1024
    chunked, dense = _peak_increase_kib("chunked"), _peak_increase_kib("dense")
    assert dense > logits_kib, (chunked, dense)  # the measure sees the (N, V) tensors of the dense path
    assert chunked < 0.5 * dense, (chunked, dense)
