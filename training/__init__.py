"""Training and evaluation: offline corpus, tokenizer, skip-aware fine-tuning, quality report, model card."""
