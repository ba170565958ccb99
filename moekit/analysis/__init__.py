"""moekit.analysis: routing traces, expert load and specialisation reports with plots.

Contract: pure functions. ``record_trace(model, batches)`` returns a :class:`RoutingTrace`;
``save_trace``/``load_trace`` read and write the one trace format (safetensors, described in
``trace.py``) that offloading, placement planning and pruning all read. ``write_report`` turns a
run log and/or a trace into ``report.md`` with PNG plots. To add an analysis, add a function
that takes a trace (or a model and batches) and returns rows or paths, and a section in
``write_report``. ``linear_cka`` / ``expert_cka_matrix`` (``cka.py``) compare representations,
e.g. how alike a layer's experts compute.
"""

from moekit.analysis.cka import expert_cka_matrix, linear_cka, mean_off_diagonal
from moekit.analysis.report import (
    plot_expert_load,
    plot_loss_curves,
    read_run_log,
    specialization,
    write_report,
)
from moekit.analysis.trace import RoutingTrace, load_trace, record_trace, save_trace

__all__ = [
    "RoutingTrace",
    "expert_cka_matrix",
    "linear_cka",
    "load_trace",
    "mean_off_diagonal",
    "plot_expert_load",
    "plot_loss_curves",
    "read_run_log",
    "record_trace",
    "save_trace",
    "specialization",
    "write_report",
]
