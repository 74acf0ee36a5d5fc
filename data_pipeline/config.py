"""The data pipeline's typed config: what to read, how to augment, which teacher outputs to cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from kdlib.text.augment import AugmentConfig
from kdlib.text.masking import MaskingConfig
from kdlib.runtime.models import ModelConfig
from kdlib.text.readers import CorpusConfig
from kdlib.tasks.readers import TaskConfig
from kdlib.schemas import Architecture, TeacherOutputsConfig


@dataclass
class PipelineConfig:
    """Build one transfer set: read -> normalise -> augment -> tokenize -> teacher -> Parquet shards + manifest."""

    teacher: ModelConfig  # the frozen teacher whose outputs are cached (its tokenizer is used too)
    output_dir: str  # the transfer-set directory (shards/ and manifest.json)
    corpus: Optional[CorpusConfig] = None  # an unlabelled corpus (rows are packed to max_length)
    task: Optional[TaskConfig] = None  # or a labelled task set (one row per example, truncated)
    labels: list[str] = field(default_factory=list)  # task label names in index order (empty: sorted labels found)
    task_type: Literal["classification", "regression"] = "classification"  # regression: labels are numbers, kept as floats
    keep_text: bool = False  # task sets: store each row's (augmented) text, so a student with its own tokenizer can use it
    char_offsets: bool = False  # corpus sets: store each row's text and the character span of every teacher token, so a student with another tokenizer can be aligned to the teacher
    max_length: int = 128  # tokens per row, special tokens included
    min_length: int = 8  # packed tails shorter than this are dropped
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # Tang et al. / TinyBERT augmentation
    augment_model: Optional[ModelConfig] = None  # the masked LM proposing TinyBERT swaps (None: the teacher, if masked_lm)
    augment_unit: str = "line"  # corpus documents are augmented per line (paragraph); tasks per example
    masking: MaskingConfig = field(default_factory=MaskingConfig)  # MLM masking of corpus rows
    teacher_outputs: TeacherOutputsConfig = field(default_factory=lambda: TeacherOutputsConfig(top_k=32))  # what to cache
    batch_size: int = 32  # sequences per teacher forward (grouped by length within a shard)
    num_shards: int = 8  # rows are spread over this many shards by a hash of their id
    pack_groups: int = 16  # documents are packed within this many hash groups (parallelism of packing)
    torch_threads: int = 0  # torch threads per worker (0: torch's default)
    seed: int = 0  # masking seed (augmentation has its own in augment.seed)
    overwrite: bool = False  # replace an output_dir that was built by another teacher, tokenizer or config
    cache_root: Optional[str] = None  # a store folder: the set is built under its content key there and output_dir becomes a link to it
    architectures: dict[str, Architecture] = field(default_factory=dict)  # more rows of the Q/K/V table by model_type (kdlib.training.architectures), for qkv_layers of a family it lacks

    @property
    def swap_model(self) -> ModelConfig:
        """The masked LM whose top predictions the MLM swap draws from."""
        return self.augment_model if self.augment_model is not None else self.teacher

    def __post_init__(self) -> None:
        if (self.corpus is None) == (self.task is None):
            raise ValueError("corpus: expected exactly one of 'corpus' or 'task'")
        if self.max_length < 8:
            raise ValueError(f"max_length: expected at least 8, got {self.max_length}")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"min_length: expected 1..max_length ({self.max_length}), got {self.min_length}")
        for name in ("batch_size", "num_shards", "pack_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.cache_root is not None and not self.cache_root.strip():
            raise ValueError("cache_root: expected null or a folder path, got an empty string")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads: expected >= 0, got {self.torch_threads}")
        if self.augment_unit not in ("line", "document"):
            raise ValueError(f"augment_unit: expected 'line' or 'document', got {self.augment_unit!r}")
        if self.task is not None and self.masking.prob > 0:
            raise ValueError("masking.prob: MLM masking applies to corpora; task sets use augment.mask_prob")
        if self.keep_text and self.task is None:
            raise ValueError("keep_text: applies to task sets (corpus rows are packed across documents; "
                             "char_offsets keeps their text)")
        if self.corpus is not None and self.masking.prob > 0 and self.teacher.task == "causal_lm":
            raise ValueError("masking.prob: a causal LM predicts the next token; masking its input rows would "
                             "cache outputs for text no student reads: expected 0 with a causal_lm teacher, got "
                             f"{self.masking.prob}")
        if self.char_offsets and self.task is not None:
            raise ValueError("char_offsets: applies to corpus sets; a task set keeps its text with keep_text: true")
        if self.char_offsets and self.masking.prob > 0:
            raise ValueError(f"char_offsets: masked ids no longer match the text; expected masking.prob: 0, got "
                             f"{self.masking.prob}")
        if self.task_type not in ("classification", "regression"):
            raise ValueError(f"task_type: expected 'classification' or 'regression', got {self.task_type!r}")
        if self.task_type == "regression" and (self.task is None or self.labels):
            raise ValueError("task_type: regression needs a task set and no label list (targets are the numbers)")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels: expected distinct names, got {self.labels}")
        t, o = self.teacher.task, self.teacher_outputs
        if o.top_k and t not in ("masked_lm", "causal_lm"):
            raise ValueError(f"teacher_outputs.top_k: vocabulary outputs need a masked_lm or causal_lm teacher, got task {t!r}")
        if o.sampled_tokens and t not in ("masked_lm", "causal_lm"):
            raise ValueError(f"teacher_outputs.sampled_tokens: vocabulary draws need a masked_lm or causal_lm teacher, "
                             f"got task {t!r}")
        if o.dense_logits and t != "sequence_classification":
            raise ValueError(f"teacher_outputs.dense_logits: needs a sequence_classification teacher, got task {t!r}")
        if not (o.top_k or o.sampled_tokens or o.dense_logits or o.hidden_layers or o.pooled or o.qkv_layers):
            raise ValueError("teacher_outputs: nothing to cache (set top_k, sampled_tokens, dense_logits, hidden_layers, "
                             "qkv_layers or pooled)")
        if self.augment_model is not None and self.augment_model.task != "masked_lm":
            raise ValueError(f"augment_model.task: the TinyBERT MLM swap needs a masked_lm model, got "
                             f"{self.augment_model.task!r}")
        if self.augment.mlm_replace_prob > 0 and self.augment_model is None and t != "masked_lm":
            raise ValueError(f"augment.mlm_replace_prob: the TinyBERT MLM swap needs a masked LM: set augment_model "
                             f"(e.g. {{path: <folder>, task: masked_lm}}), or use a masked_lm teacher (got task {t!r})")
