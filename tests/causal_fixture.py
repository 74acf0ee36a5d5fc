"""A real (tiny) causal transfer set, in exactly the format data_pipeline writes for a causal_lm teacher.

A 4-layer, 32-wide decoder teacher (GPT-2, or Llama with grouped-query attention) with a byte-level BPE
trained on the Wikipedia sample is trained for 150 next-token steps on Wikipedia lines (so its
distributions are not uniform), then run over rows packed GPT-style: each document followed by the
end-of-text token, no [CLS], no masking. Rows are cut at seeded lengths of 8-32 tokens, so collate really pads.
Its top-k ids/logits and log-sum-exp (and optionally hidden states) go into Parquet shards with a
manifest carrying its fingerprints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdlib.cache import row_schema
from kdlib.schemas import TeacherOutputsConfig
from kdlib.teachers.outputs import rows_from_outputs, teacher_forward
from tests.tiny_models import make_tiny_decoder
from tests.tiny_tokenizers import wikipedia_lines
from tests.transfer_fixture import pad, write_fixture_set

SEQ_LEN = 32


def causal_rows(tokenizer, max_lines: int = 400) -> list[tuple[str, list[int]]]:
    """(source id, ids) rows of 8..SEQ_LEN tokens (seeded lengths, so batches pad): each line + end-of-text, cut."""
    rng = np.random.default_rng(1234)
    out = []
    for d, line in enumerate(wikipedia_lines()[:max_lines]):
        ids = tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        c = 0
        while c < len(ids):
            piece = ids[c:c + int(rng.integers(8, SEQ_LEN + 1))]
            c += len(piece)
            if len(piece) >= 6:
                out.append((f"wiki-{d}", piece))
    return out


def train_decoder(model, rows: list[list[int]], steps: int, seed: int) -> None:
    """A few Adam steps of next-token prediction, padding excluded."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids, mask = pad([rows[i] for i in rng.choice(len(rows), size=32, replace=False)])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_causal_set(root: Path, *, family: str = "gpt2", rows: int = 192, top_k: int = 8, seed: int = 0,
                     teacher_steps: int = 150, shards: int = 2, hidden_layers: tuple = ()) -> dict:
    """Teacher folder + causal transfer set under `root`; returns their paths (dropout 0 in the teacher)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI has 2 cores
    try:
        torch.manual_seed(seed)
        teacher_dir = make_tiny_decoder(root / "teacher", family=family, seed=seed)
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
        model = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
            if hasattr(model.config, name):
                setattr(model.config, name, 0.0)
        sequences = causal_rows(tokenizer)
        train_decoder(model, [s for _, s in sequences], teacher_steps, seed)
        model.save_pretrained(teacher_dir, safe_serialization=True)
        model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
        picked = np.random.default_rng(seed + 1).choice(len(sequences), size=rows, replace=False)
        outputs = TeacherOutputsConfig(top_k=top_k, hidden_layers=list(hidden_layers))
        vocab = model.config.vocab_size
        all_rows = []
        for start in range(0, rows, 64):
            batch = [sequences[i] for i in picked[start:start + 64]]
            ids, mask = pad([s for _, s in batch])
            raw = teacher_forward(model, ids, mask, outputs)
            for j, row in enumerate(rows_from_outputs(raw, ids, mask, outputs, vocab)):
                row.update(id=f"row-{start + j:06d}", source_id=batch[j][0], augmentation="original",
                           input_ids=np.asarray(batch[j][1], dtype=np.int32))
                all_rows.append(row)
    finally:
        torch.set_num_threads(threads)
    schema = row_schema(vocab_size=vocab, top_k=top_k, hidden_layers=list(hidden_layers))
    cached = {"top_k": top_k, "dense_logits": False, "hidden_layers": list(hidden_layers), "pooled": None,
              "labels": False, "mlm": False, "packing": "causal"}
    out = write_fixture_set(root / "transfer", all_rows, schema, shards, teacher_dir, "causal_lm", vocab, cached)
    return {"teacher": teacher_dir, "transfer": out}


def causal_config(paths: dict, output_dir: Path, **overrides) -> dict:
    """A small pretrain config for the causal fixture: next-token KD at every position plus next-token CE."""
    from tests.transfer_fixture import base_config

    settings = {"teacher.task": "causal_lm",
                "objectives": [{"name": "kd_topk", "weight": 1.0}, {"name": "next_token_ce", "weight": 0.5}],
                "eval_rows": 32, **overrides}
    return base_config(paths, output_dir, **settings)
