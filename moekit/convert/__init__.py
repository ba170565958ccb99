"""moekit.convert: Hugging Face checkpoint import/export (one adapter per family)."""
