"""MoE against the dense model with the same active parameters: seeded runs, mean and spread.

    # train variants x learning rates x seeds (each run is a normal `moekit train` run folder)
    python benchmarks/moe_vs_dense.py train --variant moe-small dense-small --lr 2e-3 --seeds 0 1 2
    # the table (mean +- std over seeds, tokens/s) and the loss curves with seed bands
    python benchmarks/moe_vs_dense.py summary --plot docs/img/moe_vs_dense.png
    # two existing run folders side by side (the old behaviour)
    python benchmarks/moe_vs_dense.py compare --moe runs/moe-small --dense runs/dense-small

A variant is a preset name, or one of VARIANTS below (a preset plus ModelConfig overrides, the
levers screened for issue 21). Runs go to ``ROOT/VARIANT@LR/seedN``; an existing finished run is
reused, so the command can be re-run after an interruption. Every run gets the same data, tokens,
sequence length and schedule: only the model, the learning rate and the seed change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# Levers, each at the dense twin's active FFN width (1024 = shared + top_k * expert width).
VARIANTS: dict[str, dict] = {
    # 20 experts of 192 chosen 4 at a time beside a shared expert of 256 (DeepSeekMoE/Qwen2-MoE
    # pattern); total expert width 4096 as in moe-small's 8 x 512.
    "fg20-s256": {
        "preset": "moe-small-all",
        "overrides": {"moe": {"num_experts": 20, "ffn_dim": 192, "top_k": 4, "shared_ffn_dim": 256}},
    },
    # the same with DeepSeek-V3 routing: sigmoid scores, aux-loss-free bias balancing, tiny aux loss.
    "fg20-s256-v3": {
        "preset": "moe-small-all",
        "overrides": {
            "moe": {
                "num_experts": 20,
                "ffn_dim": 192,
                "top_k": 4,
                "shared_ffn_dim": 256,
                "score_func": "sigmoid",
                "use_expert_bias": True,
            },
            "aux_loss_coef": 1e-4,
        },
    },
    # finer: 40 experts of 96, top-8, shared 256.
    "fg40-s256": {
        "preset": "moe-small-all",
        "overrides": {"moe": {"num_experts": 40, "ffn_dim": 96, "top_k": 8, "shared_ffn_dim": 256}},
    },
    # moe-small's 8 x 512 top-2 with DeepSeek-V3 routing (sigmoid, bias balancing, tiny aux loss).
    "moe-small-v3": {
        "preset": "moe-small-all",
        "overrides": {"moe": {"score_func": "sigmoid", "use_expert_bias": True}, "aux_loss_coef": 1e-4},
    },
    # fewer experts: 4 of 512, top-2 (each expert sees half the tokens; total width 2x dense).
    "moe-small-e4": {"preset": "moe-small-all", "overrides": {"moe": {"num_experts": 4}}},
    # the all-MoE layout with a dense first layer: what the moe-small preset is now (the run
    # folders of the issue-21 screen carry this name).
    "moe-small-dense0": {
        "preset": "moe-small-all",
        "overrides": {"moe_placement": "explicit", "moe_layer_indices": [1, 2, 3]},
    },
}


def variant_spec(name: str) -> tuple[str, dict]:
    """(preset, model_overrides) of a variant or a plain preset name."""
    if name in VARIANTS:
        return VARIANTS[name]["preset"], VARIANTS[name]["overrides"]
    return name, {}


def run_dir(root: Path, variant: str, lr: float, seed: int) -> Path:
    return root / f"{variant}@{lr:g}" / f"seed{seed}"


def read(run: Path) -> dict:
    """The records of one run's ``train_log.jsonl``: start, evals, end and the median tokens/s."""
    recs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in recs if r.get("event") == "start")
    evals = [r for r in recs if r.get("event") == "eval"]
    trains = [r for r in recs if r.get("event") == "train"]
    end = next((r for r in recs if r.get("event") == "end"), {})
    tokens_per_step = trains[0]["num_tokens"] / trains[0]["step"] if trains else 0
    rates = sorted(r["tokens_per_s"] for r in trains)
    return {
        "start": start,
        "evals": evals,
        "end": end,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": rates[len(rates) // 2] if rates else 0.0,
    }


def finished(run: Path) -> bool:
    log = run / "train_log.jsonl"
    return log.exists() and '"event": "end"' in log.read_text().replace('"event":"end"', '"event": "end"')


def cmd_train(args: argparse.Namespace) -> int:
    root = Path(args.root)
    for variant in args.variant:
        preset, overrides = variant_spec(variant)
        for lr in args.lr:
            for seed in args.seeds:
                out = run_dir(root, variant, lr, seed)
                if finished(out):
                    print(f"[skip] {out} (finished)")
                    continue
                overrides = dict(overrides)
                cfg = {
                    "preset": preset,
                    "model_overrides": {k: v for k, v in overrides.items() if k != "aux_loss_coef"},
                    "lr": lr,
                    "seed": seed,
                    "max_steps": args.steps,
                    "out_dir": str(out),
                }
                if "aux_loss_coef" in overrides:
                    cfg["aux_loss_coef"] = overrides["aux_loss_coef"]
                out.mkdir(parents=True, exist_ok=True)
                (out.parent / f"seed{seed}.config.json").write_text(json.dumps(cfg, indent=2))
                cmd = [
                    sys.executable,
                    "-m",
                    "moekit",
                    "train",
                    "--config",
                    str(out.parent / f"seed{seed}.config.json"),
                ]
                cmd += ["--time-limit", "0", "--no-report"]
                print(f"[run] {variant} lr={lr:g} seed={seed} -> {out}", flush=True)
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                rc = subprocess.call(cmd, env=env)
                if rc != 0:
                    print(f"[fail] {out}: moekit train exited {rc}")
                    return rc
    return 0


def collect(root: Path) -> dict[str, list[dict]]:
    """Finished runs under ``root``, grouped by ``VARIANT@LR``."""
    groups: dict[str, list[dict]] = {}
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = [read(r) for r in sorted(group.glob("seed*")) if r.is_dir() and finished(r)]
        if runs:
            groups[group.name] = runs
    return groups


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def cmd_summary(args: argparse.Namespace) -> int:
    groups = collect(Path(args.root))
    if not groups:
        print(f"no finished runs under {args.root}")
        return 1
    print(
        "| variant @ lr | seeds | total params | tokens | final val loss (mean ± std) | per seed | median tokens/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, runs in groups.items():
        finals = [r["evals"][-1]["val_loss"] for r in runs]
        m, s = mean_std(finals)
        tokens = runs[0]["evals"][-1]["step"] * runs[0]["tokens_per_step"]
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        per_seed = ", ".join(f"{x:.4f}" for x in finals)
        print(
            f"| {name} | {len(runs)} | {runs[0]['start']['num_params'] / 1e6:.1f}M | {tokens / 1e6:.2f}M | "
            f"{m:.4f} ± {s:.4f} | {per_seed} | {tps:.0f} |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, runs in groups.items():
            if args.only and name not in args.only:
                continue
            steps = [e["step"] for e in runs[0]["evals"]]
            xs = [s * runs[0]["tokens_per_step"] / 1e6 for s in steps]
            cols = [[r["evals"][i]["val_loss"] for r in runs] for i in range(len(steps))]
            mid = [statistics.fmean(c) for c in cols]
            (line,) = ax.plot(xs, mid, "o-", label=f"{name} ({len(runs)} seeds)")
            ax.fill_between(
                xs, [min(c) for c in cols], [max(c) for c in cols], color=line.get_color(), alpha=0.2
            )
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("MoE vs dense at equal active parameters (band: min-max over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")
    return 0


def build_variant(name: str):
    """The model of a variant or preset, as ``moekit train`` builds it (random init)."""
    from moekit.models import MoEForCausalLM, get_preset

    preset, overrides = variant_spec(name)
    cfg = get_preset(preset)
    changes = {k: v for k, v in overrides.items() if k not in ("aux_loss_coef", "moe")}
    if "moe" in overrides:
        changes["moe"] = cfg.moe.replace(**overrides["moe"])
    if "aux_loss_coef" in overrides:
        changes["aux_loss_coef"] = overrides["aux_loss_coef"]
    return MoEForCausalLM(cfg.replace(**changes))


def cmd_speed(args: argparse.Namespace) -> int:
    """Training-step throughput of the variants side by side, in interleaved rounds."""
    import torch
    from bench_train import step_fn, timed_rounds

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: build_variant(name).train() for name in args.variant}
    vocab = next(iter(models.values())).config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1))
    steps = {name: step_fn(m, batch, is_hf=False) for name, m in models.items()}
    med = timed_rounds(steps, args.rounds)
    tokens = args.batch_size * args.seq_len
    ref = args.variant[-1]
    print(
        f"training step, batch {args.batch_size} x {args.seq_len}, {args.threads} thread(s), {args.rounds} rounds"
    )
    print(f"| model | params | median step (s) | tokens/s | tokens/s vs {ref} |")
    print("|---|---|---|---|---|")
    for name, t in med.items():
        n = sum(p.numel() for p in models[name].parameters())
        print(f"| {name} | {n / 1e6:.1f}M | {t:.3f} | {tokens / t:.0f} | {med[ref] / t:.2f}x |")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    runs = {"MoE": read(Path(args.moe)), "dense": read(Path(args.dense))}
    print("| step | MoE val loss | dense val loss | dense - MoE |")
    print("|---|---|---|---|")
    by_step = {e["step"]: e["val_loss"] for e in runs["dense"]["evals"]}
    for e in runs["MoE"]["evals"]:
        if e["step"] in by_step:
            print(
                f"| {e['step']} | {e['val_loss']:.4f} | {by_step[e['step']]:.4f} | {by_step[e['step']] - e['val_loss']:+.4f} |"
            )
    for name, r in runs.items():
        print(
            f"{name}: median {r['tokens_per_s']:.0f} tokens/s, {r['start']['num_params'] / 1e6:.1f}M params"
        )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train variants x learning rates x seeds")
    t.add_argument("--variant", nargs="+", required=True, help=f"presets or {', '.join(VARIANTS)}")
    t.add_argument("--lr", nargs="+", type=float, default=[2e-3])
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    t.add_argument(
        "--steps", type=int, default=320, help="optimizer steps (320 = the main job's 1.31M tokens)"
    )
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--root", default="runs/moe_vs_dense")
    t.set_defaults(fn=cmd_train)
    s = sub.add_parser("summary", help="mean and spread over seeds, and the loss curves")
    s.add_argument("--root", default="runs/moe_vs_dense")
    s.add_argument("--plot", default=None, help="PNG path for the loss curves with seed bands")
    s.add_argument("--only", nargs="*", help="VARIANT@LR groups to plot (default all)")
    s.set_defaults(fn=cmd_summary)
    v = sub.add_parser("speed", help="training tokens/s of variants side by side (interleaved rounds)")
    v.add_argument("--variant", nargs="+", default=["moe-small", "moe-small-all", "dense-small"])
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--seq-len", type=int, default=256)
    v.add_argument("--rounds", type=int, default=7)
    v.add_argument("--threads", type=int, default=1)
    v.set_defaults(fn=cmd_speed)
    c = sub.add_parser("compare", help="two run folders side by side")
    c.add_argument("--moe", default="runs/moe-small")
    c.add_argument("--dense", default="runs/dense-small")
    c.set_defaults(fn=cmd_compare)
    args = p.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
