"""Distillation objectives: small pure functions of tensors, registered by name (see README.md).

Importing this package imports every loss module, which registers the losses.
"""
from kdlib.losses.registry import (KINDS, LossSpec, UnknownLossError, get_chunked, get_loss, get_spec, known_losses,
                                   register_chunked, register_loss)
from kdlib.losses import output, adaptive, topk, sparse, intermediate, attention, relational, emd, embedding, cross_tokenizer, policy  # noqa: F401  (registration)
from kdlib.losses import divergences  # noqa: F401,E402  (registration: reverse_kl, jsd, tvd)
from kdlib.losses import chunked_twins  # noqa: F401,E402  (chunked twins of the output losses)
from kdlib.losses.output import (hard_ce, kd_ce, kd_kl, logit_mse, mlm_ce, next_token_ce, soft_kd_per_position,
                                 teacher_annealing_ce)
from kdlib.losses.adaptive import (cwsm_weights, dynamic_temperature, flsw_weights, kd_dynamic_temperature,
                                   kd_prob_shift, probability_shift)
from kdlib.losses.divergences import (check_beta, jsd, jsd_per_position, reverse_kl, reverse_kl_per_position, tvd,
                                      tvd_per_position)
from kdlib.losses.topk import MISSING_MASS_MODES, kd_topk, topk_kd_error_bound
from kdlib.losses.sparse import kd_sparse, sparse_kd_per_position
from kdlib.losses.intermediate import (distilbert_cosine, embedding_mse, fsp, fsp_matrix, hidden_mse,
                                       make_projection, nst_mmd, pkd_patient)
from kdlib.losses.attention import attention_kl, attention_mse, minilmv2_relations, value_relation_kl
from kdlib.losses.relational import dml, rkd_angle, rkd_distance
from kdlib.losses.emd import bert_emd
from kdlib.losses.embedding import pooled_contrastive, pooled_cosine, pooled_mse, pooled_relation_kl
from kdlib.losses.cross_tokenizer import uld
from kdlib.losses.policy import adashare_sharing, adashare_sparsity

__all__ = [
    "KINDS", "LossSpec", "UnknownLossError", "get_chunked", "get_loss", "register_chunked", "get_spec", "known_losses", "register_loss",
    "hard_ce", "kd_ce", "kd_kl", "logit_mse", "mlm_ce", "soft_kd_per_position", "teacher_annealing_ce",
    "cwsm_weights", "dynamic_temperature", "flsw_weights", "kd_dynamic_temperature", "kd_prob_shift",
    "probability_shift", "MISSING_MASS_MODES", "kd_topk", "topk_kd_error_bound", "distilbert_cosine",
    "embedding_mse", "fsp", "fsp_matrix", "hidden_mse", "make_projection", "nst_mmd", "pkd_patient",
    "attention_kl", "attention_mse", "minilmv2_relations", "value_relation_kl", "dml", "rkd_angle",
    "rkd_distance", "bert_emd", "pooled_contrastive", "pooled_cosine", "pooled_mse", "pooled_relation_kl",
    "kd_sparse", "sparse_kd_per_position", "next_token_ce", "uld", "adashare_sparsity", "adashare_sharing",
    "check_beta", "jsd", "jsd_per_position", "reverse_kl", "reverse_kl_per_position", "tvd", "tvd_per_position",
]
