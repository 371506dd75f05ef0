"""Checkpoints: the three layouts read into the model, downloads, the tokenizer, random test checkpoints."""
