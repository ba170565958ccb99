"""moekit.cli: the ``moekit`` command (floor 8, the top: it may import every package).

Contract: each verb lives in its own module with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit code``; ``main.VERBS`` lists them. Verbs only parse arguments and call
library functions: no model math, training loop or file format lives here, and nothing below
the CLI imports it. Bad input raises ``ValueError``; ``main`` prints it as one line and returns 2.

To add a verb: write ``cli/<verb>.py`` with the three names above, register it in
``main.VERBS``, and add a test that runs ``main([...])`` on a tiny model (``tests/test_cli*.py``).
"""
