"""Task-specific distillation from a fine-tuned teacher into a general student (next issue)."""
