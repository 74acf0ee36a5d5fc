"""Score model folders side by side against a teacher: word similarity, held-out masked-LM agreement and KL,
pooled-embedding cosine, CPU speed and size (`python -m evaluate --config X.yaml`; API in evaluate.run)."""
