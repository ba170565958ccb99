"""moekit.analysis: routing traces, expert load and specialisation reports with plots."""
