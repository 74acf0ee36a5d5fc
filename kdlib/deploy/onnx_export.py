"""Export a transformers model to one ONNX file a CPU server can run without torch or transformers.

We use the TorchScript exporter (`torch.onnx.export(..., dynamo=False)` with `dynamic_axes`): on these
models it traces in about a second, needs no onnxscript at export time, and yields a graph whose batch and
sequence axes are truly symbolic (tests/deploy/test_deploy.py runs it on another shape than the dummy's). The
dynamo exporter also worked, but is several times slower and prints pages of progress; nothing it adds
(control flow, large-model external data) is needed for these fixed-architecture encoders and decoders.

The graph takes `input_ids` and `attention_mask` (int64, shape batch x sequence) and returns one output:
`logits` for a head (classification, masked LM, causal LM), `last_hidden_state` for a bare encoder.
token_type_ids are not an input (all zeros, as for single sentences); sentence pairs are not supported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from kdlib.errors import KDError
from kdlib.runtime.io import atomic_target

SUPPORTED = ("ForSequenceClassification", "ForMaskedLM", "ForCausalLM", "LMHeadModel", "Model")


class ExportError(KDError):
    """A model cannot be exported to ONNX as this project deploys it."""


def output_name(model: torch.nn.Module) -> str:
    """'logits' for a model with a head, 'last_hidden_state' for a bare encoder (BertModel and the like)."""
    name = type(model).__name__
    if not name.endswith(SUPPORTED) or not hasattr(model, "config"):
        raise ExportError(f"{name}: cannot export to ONNX; expected a transformers model whose class ends in "
                          f"{', '.join(SUPPORTED)}")
    return "last_hidden_state" if name.endswith("Model") and not name.endswith("LMHeadModel") else "logits"


class _OneOutput(torch.nn.Module):
    """(input_ids, attention_mask) -> the one output tensor; no cache, no dict (what the exporter traces)."""

    def __init__(self, model: torch.nn.Module, output: str, causal: bool):
        super().__init__()
        self.model, self.output, self.causal = model, output, causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"use_cache": False} if self.causal else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra)[self.output]


@contextlib.contextmanager
def quiet() -> None:
    """The exporter's tracer warnings, deprecation notes and printed diagnostics are noise for a user."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: torch.nn.Module, path: Path, *, opset: int = 17) -> None:
    """Write `model` as ONNX to `path` (atomically), batch and sequence axes dynamic; the model is left as it was.

    A class this cannot export (no transformers head we know, or a tracer failure such as a decoder's cache
    logic) raises ExportError naming the class.
    """
    name = output_name(model)
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    # a dummy of 2 x 8 tokens with one padded row: nothing shape-specific is baked in (dynamic_axes) and the
    # padding branch of the mask is traced
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, max(2, vocab), (2, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    axes = {0: "batch", 1: "sequence"}
    dynamic = {"input_ids": axes, "attention_mask": axes, name: axes if _per_token(model) else {0: "batch"}}
    was_training = model.training
    model.eval()
    try:
        with atomic_target(path) as tmp, quiet(), torch.no_grad():
            torch.onnx.export(_OneOutput(model, name, causal), (ids, mask), tmp, input_names=["input_ids",
                              "attention_mask"], output_names=[name], dynamic_axes=dynamic, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
    except ExportError:
        raise
    except Exception as err:  # the tracer's failures come as many exception types
        raise ExportError(f"{type(model).__name__}: ONNX export failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from err
    finally:
        model.train(was_training)


def _per_token(model: torch.nn.Module) -> bool:
    """Masked and causal LM logits have a sequence axis; a classifier's do not."""
    return not type(model).__name__.endswith("ForSequenceClassification")
