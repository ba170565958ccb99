"""moekit.models: model families built from ``moekit.layers``.

Contract: models are single-device ``nn.Module``s built from a config dataclass. Parallelism,
offloading and quantization are applied to a built model by their own packages.
"""
