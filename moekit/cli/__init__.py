"""moekit.cli: the ``moekit`` command. Each verb lives in its own module with ``HELP``, ``add_arguments`` and
``run``; ``main.VERBS`` lists them. Verbs only parse arguments and call library functions."""
