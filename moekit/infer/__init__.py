"""moekit.infer: fast generation, expert offloading and the OpenAI-compatible server."""
