"""Task-specific distillation: fine-tune a teacher per fold, distil a student on the fold's task transfer set, and
compare it with the teacher and a no-KD baseline under k-fold cross-validation (`python -m finetune`)."""
