"""A narrower student initialised from the teacher (init=svd): every copied weight is compressed into a
d-dimensional orthonormal basis U (D x d) of the teacher's residual stream, computed from weights alone.

Why this basis. In a post-LN BERT every layer reads and writes the same residual stream, so one basis
serves every layer: a matrix that reads the stream (query/key/value, the FFN's first layer) becomes
W U, one that writes it (attention output, the FFN's second layer) becomes U^T W, embeddings become
E U, and the tied decoder follows the word embeddings. The states of that stream are LayerNorm outputs
gamma * n + beta, so U is fitted to a weights-only second moment of them (`residual_moment`): the
embedding LayerNorm applied to word + position + token type (drawn independently and uniformly), plus
every layer's LayerNorm applied to an isotropic normalised input (diag(gamma) P diag(gamma) + beta beta^T).
On the demo MiniLM teacher this basis beat the embedding matrix's own principal directions (top-1
agreement of a 384->192 student with the teacher at initialisation 0.30 vs 0.01) and matched a basis
fitted to real hidden states. U holds the all-ones direction plus the top d - 1 eigenvectors of that
moment (ones removed), rotated by one Householder reflection so that the student's all-ones vector
maps onto the teacher's: LayerNorm's mean removal then commutes with the projection exactly. Its
division by the standard deviation and its per-feature gain do not: gamma becomes the diagonal of
U^T diag(gamma) U times sqrt(D / d) (the student's deviation is sqrt(d / D) of the teacher's when the
state lies in span U), beta becomes U^T beta. The MLM head's transform is projected the same way
(U^T W U) although its GELU then acts on rotated units: approximate, like the LayerNorms. With d = D,
U is the identity and this is an exact copy.

Attention: the student keeps its `num_attention_heads` heads, the teacher heads with the largest
output (OV-circuit) norm, in teacher order. When the student's head is as wide as the teacher's
they are copied (in the basis); when narrower, each head's bilinear query-key form [Wq U | bq]^T
[Wk U | bk] and its value-output map U^T Wo [Wv U | bv] are truncated by SVD to the student's head
size (bias terms ride along as an extra input coordinate fixed at 1; the score scale 1/sqrt(head)
is folded in). The value-bias output of dropped heads is a constant and goes into the output bias.
FFN: the student's units are the teacher's units with the largest ||W1_u U|| ||U^T W2_u||.
All numerics in float64; pure functions of the weights (no data, no randomness).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

_LAYER = re.compile(r"^(.*\.layer\.)(\d+)(\..*)$")
_TABLE = re.compile(r"embeddings\.(word|position|token_type)_embeddings\.weight$")
_EMBEDDING_NORM = re.compile(r"embeddings\.(LayerNorm|layer_norm)\.weight$")
_RESIDUAL_NORM = re.compile(r"(embeddings|\.layer\.\d+\..*)\.(LayerNorm|layer_norm)\.weight$")
_QKV = ("query", "key", "value")


def householder_to_ones(d: int) -> Tensor:
    """An orthogonal symmetric (d x d) H with H e_1 = 1/sqrt(d) (and back)."""
    ones = torch.full((d,), 1.0 / math.sqrt(d), dtype=torch.float64)
    v = -ones
    v[0] += 1.0
    if float(v @ v) < 1e-30:
        return torch.eye(d, dtype=torch.float64)
    return torch.eye(d, dtype=torch.float64) - 2.0 * torch.outer(v, v) / (v @ v)


def embedding_moment(tables: list[Tensor]) -> Tensor:
    """E[s s^T] of s = sum of one uniformly drawn row of each table, drawn independently (D x D, float64)."""
    tables = [t.double() for t in tables]
    means = [t.mean(0) for t in tables]
    moment = sum(t.T @ t / t.shape[0] for t in tables)
    for i in range(len(tables)):
        for j in range(len(tables)):
            if i != j:
                moment = moment + torch.outer(means[i], means[j])
    return moment


def residual_moment(source: dict[str, Tensor]) -> Tensor:
    """A weights-only second moment (D x D) of the teacher's residual-stream states, i.e. of its LayerNorm
    outputs gamma * n + beta: for the embedding LayerNorm, n is the normalised embedding sum (covariance
    from `embedding_moment`); for every layer's LayerNorm, n is taken isotropic (centred, unit variance),
    so each contributes diag(gamma) P diag(gamma) + beta beta^T."""
    tables = [source[k] for k in sorted(k for k in source if _TABLE.search(k))]
    full = tables[0].shape[1]
    centre = torch.eye(full, dtype=torch.float64) - 1.0 / full
    covariance = centre @ embedding_moment(tables) @ centre
    covariance = covariance * full / torch.trace(covariance).clamp(min=1e-30)  # normalised: unit variance per feature
    moment = torch.zeros(full, full, dtype=torch.float64)
    for name in sorted(k for k in source if _RESIDUAL_NORM.search(k)):
        gamma, beta = source[name].double(), source[name[:-len("weight")] + "bias"].double()
        inner = covariance if _EMBEDDING_NORM.search(name) else centre
        moment += gamma[:, None] * inner * gamma[None, :] + torch.outer(beta, beta)
    return moment


def residual_basis(source: dict[str, Tensor], width: int) -> Tensor:
    """The D x `width` orthonormal basis of the module docstring (identity at the teacher's width)."""
    moment = residual_moment(source)
    full = moment.shape[0]
    if width == full:
        return torch.eye(full, dtype=torch.float64)
    if not 1 <= width < full:
        raise ValueError(f"hidden_size: expected 1..{full} (the teacher's width) for init=svd, got {width}")
    centre = torch.eye(full, dtype=torch.float64) - 1.0 / full
    centred = centre @ moment @ centre
    values, vectors = torch.linalg.eigh((centred + centred.T) / 2)  # ascending
    top = vectors[:, torch.argsort(values, descending=True, stable=True)[:width - 1]]
    top = top * torch.where(top.sum(0, keepdim=True) < 0, -1.0, 1.0).to(top)  # a fixed sign per vector
    basis = torch.cat([torch.full((full, 1), 1.0 / math.sqrt(full), dtype=torch.float64), top], dim=1)
    return basis @ householder_to_ones(width)


def norm_gain(gamma: Tensor, basis: Tensor, scale: float) -> Tensor:
    """A LayerNorm's gain in the basis: scale * diag(U^T diag(gamma) U), the best diagonal stand-in for the
    full matrix U^T diag(gamma) U (its bias is U^T beta)."""
    return scale * ((basis ** 2) * gamma.double()[:, None]).sum(0)


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, ties to the lower index, returned in increasing order."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


def compress_ffn(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, basis: Tensor, units: int) -> tuple:
    """(w1, b1, w2, b2) with the `units` largest-contribution hidden units, in the basis."""
    r1, r2 = w1.double() @ basis, basis.T @ w2.double()
    keep = top_indices(r1.norm(dim=1) * r2.norm(dim=0), units)
    return r1[keep], b1.double()[keep], r2[:, keep], basis.T @ b2.double()


def _split_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """matrix ~ left @ right with left (m x rank), right (rank x n), singular values split evenly."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if s.shape[0] < rank:  # a rank below the head size: pad with zeros
        pad = rank - s.shape[0]
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], 1)
        vh = torch.cat([vh, vh.new_zeros(pad, vh.shape[1])], 0)
        s = torch.cat([s, s.new_zeros(pad)])
    root = s.sqrt()
    return u * root, root[:, None] * vh


def compress_attention(w: dict[str, Tensor], basis: Tensor, heads_t: int, heads_s: int) -> dict[str, Tensor]:
    """w: query/key/value weight+bias ("query.weight", ...), "output.weight", "output.bias" of one teacher layer.
    Returns the same keys for the student: `heads_s` heads of width d / heads_s in the basis."""
    width = basis.shape[1]
    head_t, head_s = w["query.weight"].shape[0] // heads_t, width // heads_s
    if heads_s > heads_t or head_s > head_t:
        raise ValueError(f"num_attention_heads: init=svd needs at most the teacher's {heads_t} heads of at most "
                         f"{head_t} dimensions, got {heads_s} heads of {head_s}")

    def aug(part: str, h: int) -> Tensor:  # [W_h U | b_h]: (head_t, d + 1)
        rows = slice(h * head_t, (h + 1) * head_t)
        return torch.cat([w[f"{part}.weight"].double()[rows] @ basis, w[f"{part}.bias"].double()[rows, None]], 1)

    out_w = w["output.weight"].double()
    write = [basis.T @ out_w[:, h * head_t:(h + 1) * head_t] for h in range(heads_t)]  # U^T Wo_h: (d, head_t)
    ov = [write[h] @ aug("value", h) for h in range(heads_t)]  # (d, d + 1)
    keep = top_indices(torch.stack([m.norm() for m in ov]), heads_s).tolist()
    out_b = basis.T @ w["output.bias"].double()
    for h in sorted(set(range(heads_t)) - set(keep)):  # a dropped head's value bias adds a constant: keep it
        out_b = out_b + ov[h][:, width]
    parts: dict[str, list[Tensor]] = {p: [] for p in _QKV}
    writes = []
    for h in keep:
        if head_s == head_t:
            q, k, v, o = aug("query", h), aug("key", h), aug("value", h), write[h]
        else:
            scale = math.sqrt(math.sqrt(head_s / head_t))  # folds 1/sqrt(head_t) -> 1/sqrt(head_s) into q and k
            left, right = _split_svd(aug("query", h).T @ aug("key", h), head_s)
            q, k = scale * left.T, scale * right
            o, v = _split_svd(ov[h], head_s)
        for part, m in zip(_QKV, (q, k, v)):
            parts[part].append(m)
        writes.append(o)
    result = {}
    for part in _QKV:
        stacked = torch.cat(parts[part], 0)
        result[f"{part}.weight"], result[f"{part}.bias"] = stacked[:, :width], stacked[:, width]
    result["output.weight"], result["output.bias"] = torch.cat(writes, 1), out_b
    return result


# ---------------------------------------------------------------- whole models (BERT / RoBERTa naming)

_SQUARE = re.compile(r"(predictions\.transform\.dense|lm_head\.dense|pooler\.dense)\.(weight|bias)$")
_NORM = re.compile(r"(LayerNorm|layer_norm)\.(weight|bias)$")
_COPY = re.compile(r"(predictions\.bias|decoder\.bias|lm_head\.bias|classifier\.bias)$")
_READ = re.compile(r"(decoder|classifier)\.weight$")  # rows read the residual (decoder: tied to the word table)
_ATTENTION = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
              "attention.output.dense": "output"}
_INNER = {f"{name}.{kind}" for name in (*_ATTENTION, "intermediate.dense", "output.dense")
          for kind in ("weight", "bias")}  # names inside a layer that _layer compresses together


def _layer(source: dict, prefix: str, basis: Tensor, heads_t: int, heads_s: int, units: int) -> dict[str, Tensor]:
    """One teacher layer's attention and FFN weights compressed, keyed by their name inside the layer."""
    weights = {f"{short}.{kind}": source[f"{prefix}{name}.{kind}"]
               for name, short in _ATTENTION.items() for kind in ("weight", "bias")}
    att = compress_attention(weights, basis, heads_t, heads_s)
    out = {f"{name}.{kind}": att[f"{short}.{kind}"] for name, short in _ATTENTION.items()
           for kind in ("weight", "bias")}
    ffn = [source[f"{prefix}{name}"] for name in ("intermediate.dense.weight", "intermediate.dense.bias",
                                                   "output.dense.weight", "output.dense.bias")]
    w1, b1, w2, b2 = compress_ffn(*ffn, basis, units)
    out.update({"intermediate.dense.weight": w1, "intermediate.dense.bias": b1,
                "output.dense.weight": w2, "output.dense.bias": b2})
    return out


def compress_state(source: dict[str, Tensor], target: dict[str, torch.Size], teacher_layers: list[int], *,
                   heads_t: int, heads_s: int, skip_missing: tuple[str, ...] = (),
                   basis: Tensor | None = None) -> dict[str, Tensor]:
    """The student's state (float64, shapes of `target`) from the teacher's: student layer i <- teacher layer
    teacher_layers[i] (1-based), every other weight by its name's rule. Student weights whose name starts
    with `skip_missing` and that the teacher lacks are left out (they keep their own init)."""
    tables = [source[k] for k in sorted(k for k in source if _TABLE.search(k))]
    words = [k for k in target if k.endswith("word_embeddings.weight")]
    if not tables or not words:
        raise ValueError("init=svd: teacher and student need BERT-style embeddings (embeddings.word_embeddings)")
    width, full = target[words[0]][1], tables[0].shape[1]
    basis = residual_basis(source, width) if basis is None else basis.double()
    scale = math.sqrt(full / width)  # the student's LayerNorm deviation is sqrt(d / D) of the teacher's
    layers: dict[str, dict] = {}
    state = {}
    for name, shape in target.items():
        match = _LAYER.match(name)
        key = name if match is None else f"{match[1]}{teacher_layers[int(match[2])] - 1}{match[3]}"
        if key not in source and name.startswith(skip_missing):
            continue
        if key not in source:
            raise ValueError(f"init=svd: the teacher has no weight {key} for student weight {name}")
        value = source[key].double()
        inner = match[3][1:] if match else None
        if inner is not None and inner in _INNER:
            prefix = key[:len(key) - len(inner)]
            if prefix not in layers:
                units = target[f"{match[1]}{match[2]}.intermediate.dense.weight"][0]
                layers[prefix] = _layer(source, prefix, basis, heads_t, heads_s, units)
            value = layers[prefix][inner]
        elif _TABLE.search(name) or _READ.search(name):
            value = value @ basis
        elif _SQUARE.search(name):
            value = basis.T @ value @ basis if value.ndim == 2 else basis.T @ value
        elif _NORM.search(name):
            value = norm_gain(value, basis, scale) if name.endswith("weight") else basis.T @ value
        elif not _COPY.search(name):
            raise ValueError(f"init=svd: no width rule for teacher weight {key}")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"init=svd: student weight {name} has shape {tuple(shape)}, the compressed teacher "
                             f"weight {key} {tuple(value.shape)}")
        state[name] = value
    return state


def compress_teacher(student: torch.nn.Module, teacher: torch.nn.Module, teacher_layers: list[int],
                     skip_missing: tuple[str, ...] = (), basis: Tensor | None = None) -> None:
    """Initialise `student` (narrower, or with fewer heads / FFN units) in place from `teacher` (see the top)."""
    target = student.state_dict()
    state = compress_state(teacher.state_dict(), {k: v.shape for k, v in target.items()}, teacher_layers,
                           heads_t=teacher.config.num_attention_heads, heads_s=student.config.num_attention_heads,
                           skip_missing=skip_missing, basis=basis)
    with torch.no_grad():
        for name, value in state.items():
            target[name].copy_(value.to(target[name].dtype))
