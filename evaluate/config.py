"""The evaluation config: which model folders to score, against which teacher, on what.

Everything here is checked when the file is loaded; checks that need the folders themselves (they exist,
hold safetensors, accept the sequence lengths; the transfer set has a held-out part) run in
`evaluate.run.check_inputs` before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kdlib.config import check_positive_ints


def _non_negative(owner, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")


@dataclass
class HeldOutConfig:
    """Held-out text: the corpus documents after the ones the transfer set was built from."""

    enabled: bool = True  # masked top-1 agreement, masked KL and pooled cosine on held-out text (needs transfer_set)
    max_length: int = 128  # tokens per held-out sequence ([CLS] + chunk, packed as the pipeline packs)
    max_sequences: int = 64  # held-out sequences scored (the first ones after the transfer set's documents)
    min_length: int = 16  # a last, shorter chunk is kept only from this many tokens
    mask_prob: float = 0.15  # fraction of tokens selected for the masked-LM metrics (BERT 80/10/10, whole words)
    seed: int = 0  # masking seed: row r's mask comes from numpy default_rng([seed, r]), the same for every model
    batch_size: int = 16  # sequences per forward pass

    def __post_init__(self) -> None:
        check_positive_ints(self, "max_length", "max_sequences", "min_length", "batch_size")
        _non_negative(self, "seed")
        if self.max_length < 2:
            raise ValueError(f"max_length: expected at least 2 ([CLS] and one token), got {self.max_length}")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length: expected at most max_length ({self.max_length}), got {self.min_length}")
        if isinstance(self.mask_prob, bool) or not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob: expected a probability in (0, 1), got {self.mask_prob!r}")


@dataclass
class SpeedConfig:
    """CPU inference speed of each encoder, all timed side by side (kdlib.runtime.speed.compare_speed)."""

    enabled: bool = True  # time the models (off: quicker evaluations; the speed column shows n/a)
    batch_size: int = 32  # sequences per timed batch
    length: int = 128  # tokens per sequence (no padding)
    batches: int = 1  # batches per timed pass
    threads: int = 1  # torch intra-op threads, the same for every model
    warmup: int = 1  # untimed passes per model first
    repeats: int = 3  # timed passes per model, interleaved across models; the fastest counts
    seed: int = 0  # seed of the token ids timed (uniform below the smallest vocabulary: cost depends on shape only)

    def __post_init__(self) -> None:
        check_positive_ints(self, "batch_size", "length", "batches", "threads", "repeats")
        _non_negative(self, "warmup", "seed")


@dataclass
class EvaluateConfig:
    """Score model folders side by side against one of them, the teacher."""

    models: dict[str, str]  # name -> model folder or package:<module>; one of them is the teacher
    teacher: str  # the name (a key of models) every other model is compared with
    output_dir: str  # where evaluation.json, evaluation.md and evaluation.png are written
    transfer_set: Optional[str] = None  # the students' transfer set: its corpus and max_documents fix the held-out text
    heldout: HeldOutConfig = field(default_factory=HeldOutConfig)  # the held-out text metrics
    speed: SpeedConfig = field(default_factory=SpeedConfig)  # the timing
    word_similarity: bool = True  # SimLex-999 and WordSim-353 Spearman (from gensim's test data)
    word_batch_size: int = 256  # words per forward pass when embedding the word-similarity vocabulary
    threads: int = 0  # torch threads for the metric forward passes (0: leave torch's default)
    progress_bar: bool = True  # a tqdm bar over the models (quiet when stderr is not a terminal)
    overwrite: bool = False  # replace an evaluation in output_dir made from another config or other weights

    def __post_init__(self) -> None:
        if not isinstance(self.models, dict) or not self.models:
            raise ValueError(f"models: expected a mapping of name -> model folder with at least one entry, "
                             f"got {self.models!r}")
        for name, path in self.models.items():
            if not name.strip() or "|" in name or "\n" in name:
                raise ValueError(f"models: expected model names without '|' or line breaks, got {name!r}")
            if not isinstance(path, str) or not path.strip():
                raise ValueError(f"models.{name}: expected a folder or package:<module>, got {path!r}")
            if path.startswith("package:") and not path[len("package:"):].strip():
                raise ValueError(f"models.{name}: expected package:<module>, got no module name")
        if self.teacher not in self.models:
            raise ValueError(f"teacher: expected one of the model names ({', '.join(self.models)}), "
                             f"got {self.teacher!r}")
        if not self.output_dir.strip():
            raise ValueError("output_dir: expected a folder path, got an empty string")
        if self.heldout.enabled and not (self.transfer_set or "").strip():
            raise ValueError("transfer_set: expected the students' transfer-set folder (it decides which text is "
                             "held out), got none; or set heldout.enabled: false")
        check_positive_ints(self, "word_batch_size")
        _non_negative(self, "threads")
