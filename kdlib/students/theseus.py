"""BERT-of-Theseus: compress a fine-tuned BERT classifier by progressive module replacement.

Xu et al. 2020 ("BERT-of-Theseus: Compressing BERT by Progressive Module Replacing"). The
predecessor's N layers are cut into ``successor_layers`` groups of k = N / successor_layers
consecutive layers; successor module i (one BertLayer) stands in for group i. In training, each
module is independently swapped in with probability p, so the successor learns to work inside the
frozen predecessor before it has to work alone; p follows a linear curriculum and reaches 1 (the
paper's "successor fine-tuning" phase). In eval mode only the successor runs: that is the
compressed model, exported by :meth:`TheseusModel.successor_model` as a plain
``BertForSequenceClassification`` that ``from_pretrained`` loads.

Choices, after the paper and its official code (JetRunner/BERT-of-Theseus):

- successor module i starts as a copy of predecessor layer i (the first ``successor_layers``
  layers), as ``run_glue.py`` does;
- predecessor layers are frozen (``requires_grad=False``);
- embeddings, pooler, dropout and classifier are *shared* between predecessor and successor (the
  same module objects, not copies) and frozen by default: the official optimizer holds only the
  successor layers. ``train_embeddings`` / ``train_head`` unfreeze them (then training changes the
  predecessor object passed in, since the modules are shared).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import BertForSequenceClassification
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import SequenceClassifierOutput


@dataclass
class TheseusConfig:
    """What to compress into and how fast modules are replaced."""

    successor_layers: int = 3  # layers of the successor (the compressed model); must divide the predecessor's
    replacement_start: float = 0.3  # replacement probability at step 0 (b in the paper's p = k*t + b)
    replacement_end: float = 1.0  # probability reached (linearly) at the end of the replacement phase
    replacement_steps: int = 0  # length of the replacement phase in steps; 0 means the whole run given to set_step
    train_embeddings: bool = False  # also train the shared embeddings (the paper and official code freeze them)
    train_head: bool = False  # also train the shared pooler + classifier (frozen in the paper and official code)

    def __post_init__(self) -> None:
        if isinstance(self.successor_layers, bool) or not isinstance(self.successor_layers, int) \
                or self.successor_layers < 1:
            raise ValueError(f"successor_layers: expected an int >= 1, got {self.successor_layers!r}")
        for name in ("replacement_start", "replacement_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
        if self.replacement_end < self.replacement_start:
            raise ValueError(f"replacement_end: expected >= replacement_start {self.replacement_start} "
                             f"(the curriculum only rises), got {self.replacement_end}")
        if isinstance(self.replacement_steps, bool) or not isinstance(self.replacement_steps, int) \
                or self.replacement_steps < 0:
            raise ValueError(f"replacement_steps: expected an int >= 0, got {self.replacement_steps!r}")
        for name in ("train_embeddings", "train_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")


def replacement_probability_at(config: TheseusConfig, step: int, total_steps: int) -> float:
    """Curriculum value at `step`: linear from start to end over the phase, then 1 (successor fine-tuning).

    With S = replacement_steps (or total_steps when 0): p = start + (end - start) * step / S for
    step < S, and 1 from step S on, so the run always ends with the successor alone. With end = 1
    this is the paper's min(k*t + b, 1) with k = (1 - b) / S; with start = end it is the official
    "constant" scheduler (rate until ``steps_for_replacing``, then 1).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps: expected an int >= 1, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    phase = config.replacement_steps or total_steps
    if step >= phase:
        return 1.0
    p = config.replacement_start + (config.replacement_end - config.replacement_start) * step / phase
    return float(min(max(p, 0.0), 1.0))


class TheseusModel(nn.Module):
    """Predecessor and successor in one module; see the module docstring for what trains.

    ``last_choices`` holds, after each training forward, one bool per successor module: True when
    the successor module ran, False when its k predecessor layers ran instead.
    """

    def __init__(self, predecessor: BertForSequenceClassification, config: TheseusConfig, *, seed: int = 0):
        super().__init__()
        if not isinstance(predecessor, BertForSequenceClassification):
            raise ValueError(f"predecessor: expected a BertForSequenceClassification, got {type(predecessor).__name__}")
        pconf = predecessor.config
        if pconf.is_decoder or pconf.add_cross_attention:
            raise ValueError("predecessor: expected a bidirectional encoder (is_decoder=False), got a decoder config")
        n = pconf.num_hidden_layers
        if n % config.successor_layers != 0:
            raise ValueError(f"successor_layers: expected a divisor of the predecessor's {n} layers, "
                             f"got {config.successor_layers}")
        self.theseus_config = config
        self.seed = seed  # kept for the record: the draws use torch's global RNG, so seed that (resumable state)
        self.ratio = n // config.successor_layers  # k predecessor layers per successor module
        self.predecessor_config = pconf
        self.config = copy.deepcopy(pconf)
        self.config.num_hidden_layers = config.successor_layers
        self.num_labels = pconf.num_labels

        bert = predecessor.bert
        self.embeddings = bert.embeddings  # shared
        self.predecessor_layers = bert.encoder.layer  # shared, frozen
        self.successor_layers = nn.ModuleList(copy.deepcopy(bert.encoder.layer[i])
                                              for i in range(config.successor_layers))
        self.pooler = bert.pooler  # shared
        self.dropout = predecessor.dropout
        self.classifier = predecessor.classifier  # shared
        if self.pooler is None:
            raise ValueError("predecessor: expected a BERT with a pooler (add_pooling_layer=True), got none")

        for p in self.predecessor_layers.parameters():
            p.requires_grad_(False)
        for p in self.successor_layers.parameters():
            p.requires_grad_(True)
        for p in self.embeddings.parameters():
            p.requires_grad_(config.train_embeddings)
        for module in (self.pooler, self.classifier):
            for p in module.parameters():
                p.requires_grad_(config.train_head)
        self._p = replacement_probability_at(config, 0, max(config.replacement_steps, 1))
        self.last_choices: tuple[bool, ...] = ()
        self.train(predecessor.training)

    # ---- curriculum -------------------------------------------------------------------------------
    def set_step(self, step: int, total_steps: int) -> None:
        """Set the replacement probability for optimizer step `step` of a run of `total_steps`."""
        self._p = replacement_probability_at(self.theseus_config, step, total_steps)

    def replacement_probability(self) -> float:
        return self._p

    # ---- forward ----------------------------------------------------------------------------------
    def draw_choices(self) -> tuple[bool, ...]:
        """One Bernoulli(p) per successor module from torch's global CPU RNG.

        Always exactly ``successor_layers`` uniforms per training forward, whatever p, so the RNG
        stream (and a resumed run) does not depend on the curriculum.
        """
        u = torch.rand(self.theseus_config.successor_layers)
        return tuple(bool(x) for x in (u < self._p).tolist())

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, output_hidden_states: bool = False,
                token_type_ids: Optional[Tensor] = None, **ignored) -> SequenceClassifierOutput:
        """Logits (B, num_labels); hidden_states = embeddings + output after each successor position.

        Training: module i is the successor module with probability p, else predecessor layers
        i*k .. i*k+k-1 (hidden_states then holds the output after the group). Eval: successor only.
        """
        if "labels" in ignored:
            raise TypeError("labels: TheseusModel returns logits only; compute the loss from .logits")
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        # The same mask BertModel builds (None, bool or additive float depending on the attention backend).
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        choices = self.draw_choices() if self.training else (True,) * len(self.successor_layers)
        if self.training:
            self.last_choices = choices
        states = [hidden] if output_hidden_states else None
        for i, use_successor in enumerate(choices):
            group = [self.successor_layers[i]] if use_successor else \
                self.predecessor_layers[i * self.ratio:(i + 1) * self.ratio]
            for layer in group:
                hidden = layer(hidden, mask)
            if states is not None:
                states.append(hidden)
        pooled = self.dropout(self.pooler(hidden))
        logits = self.classifier(pooled)
        if self.training and torch.is_grad_enabled():
            logits = _backward_safe(logits)
            states = [_backward_safe(s) for s in states] if states is not None else None
        return SequenceClassifierOutput(logits=logits, hidden_states=tuple(states) if states is not None else None)

    # ---- export -----------------------------------------------------------------------------------
    def successor_model(self) -> BertForSequenceClassification:
        """An independent BertForSequenceClassification (fresh tensors) of the successor, in eval mode.

        All its parameters require grad (it is a plain model, e.g. for further fine-tuning);
        ``save_pretrained`` / ``from_pretrained`` round-trip it.
        """
        ref = next(self.successor_layers.parameters())
        model = BertForSequenceClassification(copy.deepcopy(self.config))
        model.to(device=ref.device, dtype=ref.dtype)
        model.load_state_dict(successor_state_dict(self), strict=True)
        return model.eval()


def _backward_safe(t: Tensor) -> Tensor:
    """`t`, or a grad-requiring leaf copy of it when no trainable parameter produced it.

    With the paper's freezing only successor modules train, so a forward in which every module
    took the predecessor path (probability (1-p)^n, 34% at p=0.3 with 3 modules) yields a loss
    without a graph and a plain ``loss.backward()`` would raise. As a leaf, backward runs and
    leaves every parameter's grad None: the optimizer skips them, as the paper's step would.
    """
    return t if t.requires_grad else t.detach().requires_grad_(True)


def successor_state_dict(model: TheseusModel) -> dict[str, Tensor]:
    """State dict (cloned, detached) with BertForSequenceClassification keys for the successor."""
    parts = {"bert.embeddings.": model.embeddings, "bert.pooler.": model.pooler, "classifier.": model.classifier}
    out: dict[str, Tensor] = {}
    for prefix, module in parts.items():
        for key, value in module.state_dict().items():
            out[prefix + key] = value.detach().clone()
    for i, layer in enumerate(model.successor_layers):
        for key, value in layer.state_dict().items():
            out[f"bert.encoder.layer.{i}.{key}"] = value.detach().clone()
    return out
