"""moekit.compress: expert quantization and pruning, as pure functions over built models."""
