"""moekit.train: corpora, tokenizer, the training loop and atomic checkpoints."""
