"""MoE against the dense model with the same active parameters, trained on the same tokens.

    moekit train --time-limit 0                          # runs/moe-small (the main job)
    moekit train --preset dense-small --time-limit 0     # runs/dense-small
    python benchmarks/moe_vs_dense.py                    # table + docs/img/moe_vs_dense.png

Reads both runs' ``train_log.jsonl`` and prints validation loss at every evaluation, the final
numbers, wall-clock and tokens/s, and plots validation loss against training tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(run: Path) -> dict:
    recs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in recs if r.get("event") == "start")
    evals = [r for r in recs if r.get("event") == "eval"]
    trains = [r for r in recs if r.get("event") == "train"]
    end = next((r for r in recs if r.get("event") == "end"), {})
    tokens_per_step = trains[0]["num_tokens"] / trains[0]["step"] if trains else 0
    return {
        "start": start,
        "evals": evals,
        "end": end,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": sorted(r["tokens_per_s"] for r in trains)[len(trains) // 2] if trains else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default="runs/moe-small")
    p.add_argument("--dense", default="runs/dense-small")
    p.add_argument("--plot", default="docs/img/moe_vs_dense.png")
    args = p.parse_args()
    runs = {"MoE (moe-small)": read(Path(args.moe)), "dense (dense-small)": read(Path(args.dense))}
    print(
        "| model | total params | steps | tokens | final val loss | perplexity | wall-clock (s) | median tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        last = r["evals"][-1]
        tokens = last["step"] * r["tokens_per_step"]
        print(
            f"| {name} | {r['start']['num_params'] / 1e6:.1f}M | {last['step']} | {tokens / 1e6:.2f}M | "
            f"{last['val_loss']:.4f} | {last['val_perplexity']:.1f} | {r['end'].get('elapsed_s', float('nan')):.0f} | "
            f"{r['tokens_per_s']:.0f} |"
        )
    unigram = next(iter(runs.values()))["start"]["unigram_val_loss"]
    print(f"\nunigram baseline: {unigram:.4f}")
    print("\n| step | " + " | ".join(f"{n} val loss" for n in runs) + " | gap (dense - MoE) |")
    print("|---|" + "---|" * (len(runs) + 1))
    moe, dense = runs.values()
    by_step = {e["step"]: e["val_loss"] for e in dense["evals"]}
    for e in moe["evals"]:
        if e["step"] in by_step:
            print(
                f"| {e['step']} | {e['val_loss']:.4f} | {by_step[e['step']]:.4f} | {by_step[e['step']] - e['val_loss']:+.4f} |"
            )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in runs.items():
        xs = [e["step"] * r["tokens_per_step"] / 1e6 for e in r["evals"]]
        ax.plot(xs, [e["val_loss"] for e in r["evals"]], "o-", label=name)
    ax.axhline(unigram, color="gray", linestyle="--", label=f"unigram ({unigram:.2f})")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("MoE vs dense at equal active parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
