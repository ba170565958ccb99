"""``moekit report``: loss curves, expert-load heatmap, router entropy and a markdown summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.cli.common import resolve_model_dir

HELP = "Write PNG plots (loss, expert load, router entropy) and report.md for a training run."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    p.add_argument("--model", required=True, help="a run folder (runs/NAME) or a checkpoint folder")
    p.add_argument("--trace", help="a routing trace to analyse (default: record one on the val split)")
    p.add_argument("--trace-tokens", type=int, default=8192, help="tokens to trace when no --trace is given")
    p.add_argument("--out", help="output folder (default: <run>/report)")


def report_for_run(
    run: str | Path, trace_path: str | None = None, trace_tokens: int = 8192, out: str | None = None
) -> Path:
    """Writes the report of a run; returns the markdown path."""
    import torch

    from moekit.analysis import load_trace, record_trace, write_report
    from moekit.cli.common import evaluation_tokens, load_model_and_tokenizer

    folder = resolve_model_dir(run)
    run_dir = next(
        (c for c in (folder, folder.parent, folder.parent.parent) if (c / "train_log.jsonl").is_file()), None
    )
    log = run_dir / "train_log.jsonl" if run_dir else None
    if trace_path:
        trace = load_trace(trace_path)
    else:
        model, tok, _ = load_model_and_tokenizer(folder)
        if not model.config.moe:
            trace = None
        else:
            tokens = evaluation_tokens(tok, folder, None)
            seq = 256
            num_seq = max(1, min(trace_tokens // seq, len(tokens) // seq))
            windows = torch.from_numpy(tokens[: num_seq * seq].reshape(num_seq, seq))
            trace = record_trace(model, [(w, None) for w in windows.split(8)], str(folder))
    out_dir = Path(out) if out else (run_dir or folder) / "report"
    return write_report(out_dir, log, trace, title=f"moekit report: {(run_dir or folder).name}")


def run(args: argparse.Namespace) -> int:
    """Writes the report and prints where it went."""
    md = report_for_run(args.model, args.trace, args.trace_tokens, args.out)
    print(f"report: {md}")
    for png in sorted(md.parent.glob("*.png")):
        print(f"plot: {png}")
    return 0
