"""Reports: PNG plots and a markdown summary of a training run and of a routing trace.

Pure functions: each takes data (a run log, a trace) and an output folder and returns the paths
it wrote. Matplotlib runs with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from moekit.analysis.trace import RoutingTrace


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_run_log(path: str | os.PathLike) -> list[dict]:
    """Reads a JSON-lines run log; lines that are not JSON objects are skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _series(records: list[dict], key: str, kind: str | None = None) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if kind is not None and r.get("kind", r.get("type")) != kind:
            continue
        if key in r and r[key] is not None and "step" in r:
            xs.append(float(r["step"]))
            ys.append(float(r[key]))
    return xs, ys


def _unigram(records: list[dict]) -> float | None:
    for r in records:
        for key in ("unigram_val_loss", "unigram_loss"):
            if r.get(key) is not None:
                return float(r[key])
    return None


def plot_loss_curves(records: list[dict], out_path: str | os.PathLike, title: str = "") -> Path:
    """Train loss, validation loss and the unigram baseline against steps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label in (("lm_loss", "train LM loss"), ("loss", "train loss (with aux)")):
        xs, ys = _series(
            [r for r in records if "val_loss" not in r and r.get("event", "train") == "train"], key
        )
        if xs:
            ax.plot(xs, ys, label=label, alpha=0.8)
            break
    xs, ys = _series(records, "val_loss")
    if xs:
        ax.plot(xs, ys, "o-", label="validation loss")
    unigram = _unigram(records)
    if unigram is not None:
        ax.axhline(unigram, color="gray", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def plot_expert_load(load_LE: list[list[float]], out_path: str | os.PathLike, title: str = "") -> Path:
    """Heatmap of each MoE layer's share of assignments per expert (layers x experts)."""
    plt = _plt()
    num_e = max(len(row) for row in load_LE)
    mat = torch.full((len(load_LE), num_e), float("nan"))
    for i, row in enumerate(load_LE):
        r = torch.tensor(row, dtype=torch.float32)
        mat[i, : len(row)] = r / r.sum().clamp_min(1)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * num_e + 2), max(2.5, 0.45 * len(load_LE) + 1.5)))
    im = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(num_e))
    ax.set_yticks(range(len(load_LE)))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or "share of assignments per expert (uniform = 1/E)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def plot_router_entropy(records: list[dict], out_path: str | os.PathLike) -> Path | None:
    """Mean router entropy per MoE layer against steps, from ``router_entropy`` lists in the log."""
    rows = [(r["step"], r["router_entropy"]) for r in records if isinstance(r.get("router_entropy"), list)]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    num_layers = len(rows[0][1])
    for layer in range(num_layers):
        ax.plot([s for s, _ in rows], [e[layer] for _, e in rows], label=f"MoE layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("router entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def specialization(trace: RoutingTrace) -> list[dict]:
    """Per MoE layer: load imbalance, and how much the first-choice expert depends on the token id.

    ``token_expert_nmi`` is the mutual information between token id and first-choice expert,
    divided by the entropy of the expert choice: 0 when routing ignores the token identity, 1
    when the token id decides the expert.
    """
    rows = []
    for i, (ids_TK, num_e) in enumerate(zip(trace.expert_ids, trace.num_experts)):
        first_T = ids_TK[:, 0]
        valid = first_T >= 0
        tok, exp = trace.tokens[valid], first_T[valid]
        load = torch.bincount(ids_TK[ids_TK >= 0], minlength=num_e).double()
        p_e = torch.bincount(exp, minlength=num_e).double() / max(1, exp.numel())
        h_e = -(p_e[p_e > 0] * p_e[p_e > 0].log()).sum().item()
        # H(E | token) from the joint counts of (token, expert).
        joint = torch.zeros(int(tok.max()) + 1 if tok.numel() else 1, num_e, dtype=torch.float64)
        joint.index_put_((tok, exp), torch.ones_like(tok, dtype=torch.float64), accumulate=True)
        per_tok = joint.sum(-1, keepdim=True)
        cond = joint / per_tok.clamp_min(1)
        h_cond = -(joint * torch.where(cond > 0, cond.log(), torch.zeros_like(cond))).sum().item() / max(
            1, exp.numel()
        )
        rows.append(
            {
                "moe_layer": i,
                "decoder_layer": trace.layer_indices[i],
                "num_experts": num_e,
                "max_over_mean_load": float(load.max() / load.mean().clamp_min(1e-9)),
                "unused_experts": int((load == 0).sum()),
                "mean_experts_per_token": float((ids_TK >= 0).sum(-1).double().mean()),
                "token_expert_nmi": (h_e - h_cond) / h_e if h_e > 0 else 0.0,
            }
        )
    return rows


def write_report(
    out_dir: str | os.PathLike,
    run_log: str | os.PathLike | None = None,
    trace: RoutingTrace | None = None,
    title: str = "moekit report",
) -> Path:
    """Writes ``report.md`` with PNG plots into ``out_dir``; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    records = read_run_log(run_log) if run_log and Path(run_log).is_file() else []
    if records:
        plot_loss_curves(records, out / "loss.png", title)
        lines += ["## Loss", "", "![loss](loss.png)", ""]
        evals = [r for r in records if "val_loss" in r]
        if evals:
            last = evals[-1]
            lines.append(
                f"Final validation loss {last['val_loss']:.4f} "
                f"(perplexity {math.exp(min(last['val_loss'], 50)):.2f}) at step {last.get('step')}."
            )
        unigram = _unigram(records)
        if unigram is not None:
            lines.append(f"Unigram baseline: {unigram:.4f}.")
        lines.append("")
        if plot_router_entropy(records, out / "router_entropy.png"):
            lines += ["## Router entropy", "", "![router entropy](router_entropy.png)", ""]
        loads = [
            r["tokens_per_expert"]
            for r in records
            if isinstance(r.get("tokens_per_expert"), list)
            and r["tokens_per_expert"]
            and isinstance(r["tokens_per_expert"][0], list)
        ]
        if loads and trace is None:
            plot_expert_load(loads[-1], out / "expert_load.png", "expert load at the last logged step")
            lines += ["## Expert load", "", "![expert load](expert_load.png)", ""]
    if trace is not None:
        load = [row.tolist() for row in trace.load()]
        plot_expert_load(load, out / "expert_load.png", f"expert load over {trace.num_tokens} traced tokens")
        lines += ["## Expert load", "", "![expert load](expert_load.png)", ""]
        lines += [
            "## Routing per MoE layer",
            "",
            "| MoE layer | decoder layer | experts | max/mean load | unused | experts/token | token-expert NMI |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in specialization(trace):
            lines.append(
                f"| {row['moe_layer']} | {row['decoder_layer']} | {row['num_experts']} | "
                f"{row['max_over_mean_load']:.2f} | {row['unused_experts']} | "
                f"{row['mean_experts_per_token']:.2f} | {row['token_expert_nmi']:.3f} |"
            )
        lines.append("")
    if len(lines) == 2:
        raise ValueError("write_report: nothing to report; give a run log, a trace, or both")
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md
