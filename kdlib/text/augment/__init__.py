"""Text augmentation for transfer sets: Tang et al. 2019 (mask, same-POS swap, n-gram) and TinyBERT's MLM swap."""
from .config import AugmentConfig
from .core import AugmentedText, MlmCandidatesFn, augment_batch, augment_example, serial_augment
from .mlm import make_mlm_candidates_fn
from .tagging import default_tagger, tag_sentence, tag_sentences
from .text import Tokens, detokenize, is_eligible, tokenize
from .vocab import PosVocabulary

__all__ = [
    "AugmentConfig",
    "AugmentedText",
    "MlmCandidatesFn",
    "PosVocabulary",
    "Tokens",
    "augment_batch",
    "augment_example",
    "default_tagger",
    "detokenize",
    "is_eligible",
    "make_mlm_candidates_fn",
    "serial_augment",
    "tag_sentence",
    "tag_sentences",
    "tokenize",
]
