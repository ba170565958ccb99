"""moekit.parallel: expert parallelism on torch.distributed, applied to a built model from outside."""
