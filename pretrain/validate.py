"""Everything that can be checked before a process group starts: teacher, student shape, layer map,
transfer-set fingerprints and contents, every objective's inputs (kdlib.training.providers), batch shape
against the data, the DeepSpeed JSON.

Each rank runs this before `init_distributed`, so a bad config stops every process with one
ConfigError line (exit status 2) instead of a hung rendezvous or a traceback per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from kdlib.cache import MANIFEST, TransferSet
from kdlib.runtime.process_group import DistEnv, dist_env
from kdlib.training.deepspeed_engine import deepspeed_config
from kdlib.errors import KDError, fail_field, field_named
from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
from kdlib.runtime.io import sha256_file
from kdlib.runtime.models import check_model_folder, resolve_model_path
from kdlib.training.progressive import coverage_problem
from kdlib.schemas import check_against_teacher
from kdlib.students.shape import architecture_config
from kdlib.training.objective_plan import cached_reads, fail_objective, layer_offer, transfer_set_offer
from kdlib.training.providers import Offer
from kdlib.training.loop import check_run_folder
from kdlib.training.module import plan_objectives
from pretrain.config import PretrainConfig
from pretrain.cross_tokenizer import aligned_offer, check_cross_tokenizer
from pretrain.evaluate import metric_names
from pretrain.student import student_class


@dataclass
class Setup:
    """What validation found out, handed to the trainer."""

    source: str  # the config file, for messages
    teacher_folder: Path
    student_tokenizer_folder: Path  # where the exported student's tokenizer files come from (the teacher's by default)
    teacher_config: object  # transformers PretrainedConfig of the teacher
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    transfer_set: TransferSet
    manifest_sha256: str  # sha256 of manifest.json, named in the model card
    pairs: list[tuple[int, int]]  # layer map (teacher layer, student layer); empty without intermediate losses
    offer: Offer  # what the objectives can read (checked: every objective gets its inputs)
    ds_config: dict
    place: DistEnv


def _check_student_architecture(cfg: PretrainConfig, source: str, teacher_config) -> None:
    """student.config: another architecture is fine, but with the teacher's tokenizer its vocabulary must be the
    teacher's, and its head must be of the kind the teacher trains (a causal LM under a causal teacher)."""
    if cfg.student.config is None:
        return
    try:
        arch = architecture_config(cfg.student.config)
    except (OSError, ValueError, KDError) as err:
        fail_field(source, "student.config", f"cannot read a transformers config.json from {cfg.student.config}: {err}")
    if cfg.student.tokenizer is None and arch.vocab_size != teacher_config.vocab_size:
        fail_field(source, "student.config", f"{cfg.student.config} has vocab_size {arch.vocab_size}, but with the "
                   f"teacher's tokenizer the student needs the teacher's {teacher_config.vocab_size} (or set student.tokenizer)")
    try:
        student_class(cfg.teacher)._model_mapping[type(arch)]
    except KeyError:
        fail_field(source, "student.config", f"{type(arch).__name__} has no {student_class(cfg.teacher).__name__[9:]} "
                   f"head in transformers, which a {cfg.teacher.task} teacher's student needs")


def validate(cfg: PretrainConfig, source: str) -> Setup:
    """All pre-flight checks; errors are ConfigError / FingerprintMismatch / CacheError naming what is wrong."""
    check_run_folder(cfg.output_dir, "python -m pretrain", resume=cfg.resume)
    with field_named(source, "teacher.path"):
        folder = resolve_model_path(cfg.teacher.path)
        teacher_dict = check_model_folder(folder)
    check_against_teacher(source, teacher_dict, student=cfg.student)
    teacher_config = AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                trust_remote_code=cfg.teacher.trust_remote_code)
    causal = cfg.teacher.task == "causal_lm"
    if cfg.teacher.task not in ("masked_lm", "causal_lm"):
        fail_field(source, "teacher.task", f"general distillation trains a masked_lm or causal_lm student from a teacher "
                   f"of the same kind, got {cfg.teacher.task!r}")
    _check_student_architecture(cfg, source, teacher_config)
    if cfg.early_stopping is not None and cfg.early_stopping.metric not in metric_names(causal):
        fail_field(source, "early_stopping.metric", f"expected one of the held-out metrics "
                   f"{', '.join(metric_names(causal))}, got {cfg.early_stopping.metric!r}")
    teacher_heads = teacher_config.num_attention_heads
    student_heads = cfg.student.num_attention_heads or teacher_heads
    student_width = cfg.student.hidden_size or teacher_config.hidden_size
    if student_width % student_heads:
        fail_field(source, "student.num_attention_heads", f"expected a divisor of the student width {student_width}, "
                   f"got {student_heads}")
    try:
        layers = layer_offer(cfg.layer_map, teacher_config.num_hidden_layers, cfg.student.num_layers,
                             teacher_heads=teacher_heads, student_heads=student_heads)
    except ValueError as err:
        fail_field(source, "layer_map", str(err))

    teacher_fp, tokenizer_fp = model_fingerprint(folder), tokenizer_fingerprint(folder)
    # shard hashes are checked lazily, each the first time a process reads it: start-up reads no shard
    with field_named(source, "transfer_set"):
        transfer = TransferSet(cfg.transfer_set, teacher_fingerprint=teacher_fp, tokenizer_fingerprint=tokenizer_fp,
                               verify="lazy")
    manifest = transfer.manifest
    positions = getattr(teacher_config, "max_position_embeddings", None)
    if positions is not None and manifest.max_length > positions:
        fail_field(source, "transfer_set", f"{cfg.transfer_set} holds rows of up to {manifest.max_length} tokens, but the "
                   f"student (like its teacher) has {positions} position embeddings")
    made_for = manifest.teacher.get("task")
    if made_for in ("masked_lm", "causal_lm") and made_for != cfg.teacher.task:
        fail_field(source, "teacher.task", f"{cfg.transfer_set} was made from a {made_for} teacher, got {cfg.teacher.task!r}")
    vocab = manifest.teacher.get("vocab_size")
    if vocab is not None and vocab != teacher_config.vocab_size:
        fail_field(source, "transfer_set", f"{cfg.transfer_set} was made with vocabulary size {vocab}, the teacher has "
                   f"{teacher_config.vocab_size}")
    cached, pooling = transfer_set_offer(manifest)
    student_tokenizer = folder
    if cfg.student.tokenizer is not None:
        student_tokenizer = check_cross_tokenizer(cfg, source, manifest)
        cached = aligned_offer(cached)
    offer = Offer(online_teacher=cfg.online_teacher, cached=cached, peer=True, pooling=pooling, causal=causal,
                  **layers)
    try:
        plans = plan_objectives(cfg.objectives, offer)
    except ValueError as err:
        fail_objective(source, err)
    if cfg.progressive is not None:
        problem = coverage_problem(plans, cfg.student.num_layers)
        if problem:
            fail_field(source, "progressive", problem)
    reads = cached_reads(plans, offer)
    if cfg.student.tokenizer is not None:  # the text to align, and the teacher's top-1 for the held-out agreement
        reads = (reads - {"aligned_mask"}) | {"texts", "topk_ids"}
    transfer.read_only(reads)  # decode the columns the objectives read, nothing else
    place = dist_env()
    if cfg.progressive is not None:
        stages = cfg.progressive.steps_per_layer * cfg.student.num_layers
        if stages >= cfg.steps and place.rank == 0:  # allowed: a run may be stopped early and extended later
            print(f"{source}: note: steps={cfg.steps} ends within the progressive stages ({stages} steps); there is "
                  f"no joint phase, and layers whose stage is not reached stay as initialised", flush=True)
    ds = deepspeed_config(cfg.engine, place.world_size, cfg.steps, source=source)  # first: checks global_batch
    train_rows = len(transfer) - cfg.eval_rows
    global_batch = ds["train_batch_size"]
    if train_rows < global_batch:
        fail_field(source, "eval_rows", f"{len(transfer)} rows minus {cfg.eval_rows} held out leaves {train_rows}, "
                   f"fewer than one global batch of {global_batch} (micro_batch x grad_accum x {place.world_size} ranks)")
    return Setup(source=source, teacher_folder=folder, student_tokenizer_folder=student_tokenizer, teacher_config=teacher_config, teacher_fingerprint=teacher_fp,
                 tokenizer_fingerprint=tokenizer_fp, transfer_set=transfer,
                 manifest_sha256=sha256_file(Path(cfg.transfer_set) / MANIFEST), pairs=list(offer.pairs), offer=offer, ds_config=ds,
                 place=place)
