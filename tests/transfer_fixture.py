"""A real (tiny) transfer set for training-stage tests, in exactly the format data_pipeline writes.

A 4-layer, 32-wide BERT teacher is trained for a few dozen MLM steps on gensim's lee_background
corpus (so its distributions are not uniform), then run over masked sequences of <= 32 tokens
(documents cut into chunks, so lengths vary and collate really pads); its top-k ids/logits and
log-sum-exp are written as Parquet shards with a manifest carrying its fingerprints.
Also: helpers that launch `python -m pretrain` with 2 gloo processes, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from kdlib.cache import FORMAT_VERSION, Manifest, row_schema, rows_to_table, shard_name, write_manifest, write_shard
from kdlib.runtime.process_group import free_port  # noqa: F401  (re-exported for the tests that import it from here)
from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
from kdlib.text.readers import gensim_test_data
from kdlib.schemas import TeacherOutputsConfig
from kdlib.teachers.outputs import rows_from_outputs, teacher_forward
from tests.tiny_models import make_tiny_bert

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 32


def chunked_sequences(tokenizer, max_docs: int = 300) -> list[tuple[str, list[int]]]:
    """(source id, [CLS] ... [SEP]) chunks of <= SEQ_LEN tokens; each document's last chunk is shorter."""
    lines = gensim_test_data("lee_background.cor").read_text(encoding="utf-8").splitlines()[:max_docs]
    out = []
    for d, line in enumerate(lines):
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        body = SEQ_LEN - 2
        for c in range(0, len(ids), body):
            piece = ids[c:c + body]
            if len(piece) >= 6:
                out.append((f"lee-{d}", [tokenizer.cls_token_id] + piece + [tokenizer.sep_token_id]))
    return out


def mask_sequence(ids: list[int], rng: np.random.Generator, mask_id: int, prob: float = 0.15):
    """Replace ~prob of the inner tokens (at least one) by [MASK]; returns (masked ids, positions, originals)."""
    inner = np.arange(1, len(ids) - 1)
    count = max(1, int(round(prob * len(inner))))
    positions = np.sort(rng.choice(inner, size=count, replace=False))
    masked = list(ids)
    for p in positions:
        masked[p] = mask_id
    return masked, positions.astype(np.int32), np.asarray([ids[p] for p in positions], dtype=np.int32)


def pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def train_teacher(model, sequences: list[list[int]], mask_id: int, steps: int, seed: int) -> None:
    """A few Adam steps of MLM with labels at every position (as BERT's kept tokens), so that the teacher's
    distributions are peaked and its top-1 varies with the input rather than collapsing to one frequent word."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        chosen = rng.choice(len(sequences), size=32, replace=False)
        masked, labels = [], []
        for i in chosen:
            m, _, _ = mask_sequence(sequences[i], rng, mask_id)
            masked.append(m)
            labels.append(list(sequences[i]))  # every position predicts its original token: top-1 varies
        ids, mask = pad(masked)
        lab = torch.full_like(ids, -100)
        for i, row in enumerate(labels):
            lab[i, :len(row)] = torch.tensor(row)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_transfer_set(root: Path, *, rows: int = 320, top_k: int = 8, seed: int = 0, teacher_steps: int = 60,
                       shards: int = 2, teacher_seed: int = 0, hidden_layers: tuple = (), pooled: str | None = None,
                       dropout: float | None = None, qkv_layers: tuple = (), vector_encoding: str = "fp16",
                       sampled_tokens: int = 0) -> dict:
    """Teacher folder + transfer set under `root`; returns their paths. `hidden_layers` / `qkv_layers` / `pooled`
    cache those teacher outputs too (vectors stored with `vector_encoding`), `sampled_tokens` teacher draws per
    position (a tail outside the top-k); `dropout` (e.g. 0.0) is written into the teacher's config, which students
    copy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI has 2 cores; more threads than cores makes a tiny model 10x slower
    try:
        return _build(root, rows, top_k, seed, teacher_steps, shards, teacher_seed, tuple(hidden_layers), pooled,
                      dropout, tuple(qkv_layers), vector_encoding, sampled_tokens)
    finally:
        torch.set_num_threads(threads)


def _build(root: Path, rows: int, top_k: int, seed: int, teacher_steps: int, shards: int, teacher_seed: int,
           hidden_layers: tuple, pooled: str | None, dropout: float | None, qkv_layers: tuple = (),
           vector_encoding: str = "fp16", sampled_tokens: int = 0) -> dict:
    from transformers import BertForMaskedLM, BertTokenizerFast

    torch.manual_seed(seed)
    teacher_dir = make_tiny_bert(root / "teacher", task="masked_lm", layers=4, hidden=32, heads=4, seed=teacher_seed)
    tokenizer = BertTokenizerFast.from_pretrained(str(teacher_dir))
    model = BertForMaskedLM.from_pretrained(str(teacher_dir))
    sequences = chunked_sequences(tokenizer)
    if teacher_steps:
        train_teacher(model, [s for _, s in sequences], tokenizer.mask_token_id, teacher_steps, seed)
    if dropout is not None:
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = dropout
    if teacher_steps or dropout is not None:
        model.save_pretrained(teacher_dir, safe_serialization=True)
    model.eval()
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(len(sequences), size=rows, replace=False)
    outputs = TeacherOutputsConfig(top_k=top_k, hidden_layers=list(hidden_layers), pooled=pooled,
                                   qkv_layers=list(qkv_layers), vector_encoding=vector_encoding,
                                   sampled_tokens=sampled_tokens)
    vocab = model.config.vocab_size
    all_rows = []
    for start in range(0, rows, 64):
        batch = [sequences[i] for i in picked[start:start + 64]]
        masked = [mask_sequence(s, rng, tokenizer.mask_token_id) for _, s in batch]
        ids, mask = pad([m for m, _, _ in masked])
        raw = teacher_forward(model, ids, mask, outputs)
        seeds = [seed * 1_000_003 + start + j for j in range(len(batch))] if sampled_tokens else None
        for j, row in enumerate(rows_from_outputs(raw, ids, mask, outputs, vocab, seeds=seeds)):
            n = start + j
            # zero-padded ids keep the global order = generation order (rows_to_table sorts by id)
            row.update(id=f"row-{n:06d}", source_id=batch[j][0], augmentation="original",
                       input_ids=np.asarray(masked[j][0], dtype=np.int32), mlm_positions=masked[j][1],
                       mlm_labels=masked[j][2])
            all_rows.append(row)
    schema = row_schema(vocab_size=vocab, top_k=top_k, hidden_layers=list(hidden_layers), pooled=pooled is not None,
                        has_mlm=True, qkv_layers=list(qkv_layers), vector_encoding=vector_encoding,
                        sampled_tokens=sampled_tokens)
    cached = {"top_k": top_k, "dense_logits": False, "hidden_layers": list(hidden_layers), "pooled": pooled,
              "labels": False, "mlm": True, "qkv_layers": list(qkv_layers), "vector_encoding": vector_encoding,
              **({"sampled_tokens": sampled_tokens} if sampled_tokens else {})}
    out = write_fixture_set(root / "transfer", all_rows, schema, shards, teacher_dir, "masked_lm", vocab, cached)
    return {"teacher": teacher_dir, "transfer": out}


def write_fixture_set(out: Path, all_rows: list[dict], schema, shards: int, teacher_dir: Path, task: str, vocab: int,
                      cached: dict, max_length: int = SEQ_LEN) -> Path:
    """Rows (in id order) as `shards` Parquet shards plus the manifest data_pipeline would write for them."""
    per = -(-len(all_rows) // shards)
    infos = [write_shard(out, shard_name(s, shards), rows_to_table(all_rows[s * per:(s + 1) * per], schema))
             for s in range(shards)]
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        teacher={"ref": str(teacher_dir), "fingerprint": model_fingerprint(teacher_dir), "task": task,
                 "vocab_size": vocab, "num_layers": 4, "hidden_size": 32},
        tokenizer_fingerprint=tokenizer_fingerprint(teacher_dir), config={"fixture": True}, config_hash="fixture",
        cached=cached, dtypes={"topk_ids": "uint16", "topk_logits": "float16", "lse": "float32"},
        max_length=max_length, shards=infos,
        totals={"rows": len(all_rows), "tokens": sum(i.tokens for i in infos), "bytes": sum(i.bytes for i in infos)},
        fidelity={}, created="fixture")
    write_manifest(out, manifest)
    return out


# ---------------------------------------------------------------- running the stage as a user would


def base_config(paths: dict, output_dir: Path, **overrides) -> dict:
    """A small, fast pretrain config for the fixture (2-layer student, random init)."""
    cfg = {
        "teacher": {"path": str(paths["teacher"]), "task": "masked_lm"},
        "transfer_set": str(paths["transfer"]),
        "output_dir": str(output_dir),
        "student": {"num_layers": 2, "init": "random"},
        "objectives": [{"name": "kd_topk", "weight": 1.0}, {"name": "mlm_ce", "weight": 0.5}],
        "engine": {"zero_stage": 2, "micro_batch": 8, "grad_accum": 2, "gradient_clipping": 1.0,
                   "optim": {"learning_rate": 3e-3, "warmup_steps": 2, "weight_decay": 0.01}},
        "steps": 6, "seed": 0, "eval_rows": 64, "checkpoint_every": 3, "keep_checkpoints": 3,
        "progress_bar": False, "threads": 1,
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def stage_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO),
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def torchrun_command(config: Path, nproc: int = 2, port: int | None = None) -> list[str]:
    port = port or free_port()
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port), "-m", "pretrain", "--config", str(config)]


def run_pretrain(config: Path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """torchrun with `nproc` gloo processes; returns the completed process (stdout+stderr in .stdout)."""
    return subprocess.run(torchrun_command(config, nproc), cwd=REPO, env=stage_env(), capture_output=True,
                          text=True, timeout=timeout)


def start_pretrain(config: Path, nproc: int = 2, log: Path | None = None) -> subprocess.Popen:
    """Start torchrun in its own process group (so a test can SIGKILL the whole job)."""
    handle = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(torchrun_command(config, nproc), cwd=REPO, env=stage_env(), stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Block until metrics.jsonl records a train step >= `step` (or fail if the job ends first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("kind") == "train" and rec["step"] >= step:
                    return
        if proc.poll() is not None:
            raise AssertionError(f"job ended (code {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def export_weights(folder: Path) -> dict:
    """Every trained weight of a pretrain export: its masked_lm/ model (the encoder and the head) when it has one, else
    the folder's own (a causal student). The top's extra pooler is the teacher's, never trained."""
    head = folder / "masked_lm" / "model.safetensors"
    return load_file(str(head if head.is_file() else folder / "model.safetensors"))


def probe_export_in_clean_process(run_dir: Path, expect_class: str | None = None) -> float:
    """Load run_dir/export with plain transformers in a process that cannot import this project (the masked-LM model
    from its masked_lm/, the encoder from the top), run it on the trainer's probe batch and return the max |logit
    difference| to the probe (what the trained module gave)."""
    folder = run_dir / "export"
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModel, AutoModelForMaskedLM\n"
        f"probe = load_file({str(run_dir / 'probe_logits.safetensors')!r})\n"
        f"m = AutoModelForMaskedLM.from_pretrained({str(folder)!r}, subfolder='masked_lm').eval()\n"
        f"AutoModel.from_pretrained({str(folder)!r})\n"
        + (f"assert type(m).__name__ == {expect_class!r}, type(m).__name__\n" if expect_class else "")
        + "with torch.no_grad():\n"
        "    logits = m(input_ids=probe['input_ids'], attention_mask=probe['attention_mask']).logits\n"
        "assert not any(name.startswith(('kdlib', 'pretrain')) for name in sys.modules)\n"
        "print((logits - probe['logits']).abs().max().item())\n")
    env = {k: v for k, v in stage_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return float(proc.stdout.strip().splitlines()[-1])
