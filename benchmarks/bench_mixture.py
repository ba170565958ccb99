"""MoE² on heterogeneous models trained here: quality vs energy budget and vs latency bound.

Two stages, about five minutes together on one core (run them under the heavy lock):

    OMP_NUM_THREADS=1 flock /tmp/heavy.lock python benchmarks/bench_mixture.py --stage all
    # or --stage train, then --stage mixture

``train`` trains four experts of different sizes on different slices of the standard library,
all with the stdlib tokenizer (so they share a vocabulary). ``mixture`` profiles them, prices
their energy with a hardware profile of four made-up devices (energy cannot be metered here),
trains the gate on held-out text, measures the masking property, runs every selection method
over a range of energy budgets and latency bounds, and writes ``results.json``, ``results.md``
and two plots (``docs/img/mixture_energy.png``, ``docs/img/mixture_latency.png``).
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch

STDLIB = sysconfig.get_paths()["stdlib"]
# name -> (model overrides of moe-tiny, corpus globs under the stdlib, device). The globs put the
# root at the stdlib itself (the bracketed first letter is the glob's magic), so documents keep
# their stdlib-relative paths and every expert's held-out split is the same documents' split.
EXPERTS = {
    "net-s": (
        {"vocab_size": 4096, "dim": 64, "head_dim": 16, "moe": {"dim": 64}},
        ["[e]mail", "[h]ttp", "[u]rllib", "[x]ml", "[j]son"],
        "phone",
    ),
    "async-s": (
        {"vocab_size": 4096, "dim": 64, "head_dim": 16, "moe": {"dim": 64}},
        ["[a]syncio", "[c]oncurrent", "[m]ultiprocessing"],
        "phone",
    ),
    "gui-m": (
        {"vocab_size": 4096, "dim": 96, "head_dim": 24, "moe": {"dim": 96}},
        ["[t]kinter", "[i]dlelib", "[t]urtledemo"],
        "laptop",
    ),
    "all-l": (
        {"vocab_size": 4096, "dim": 128, "head_dim": 32, "num_layers": 3, "moe": {"dim": 128}},
        None,
        "edge-gpu",
    ),
}
HARDWARE = {
    "devices": {"phone": {"watts": 2.0}, "laptop": {"watts": 12.0}, "edge-gpu": {"watts": 30.0}},
    "assignment": {name: spec[2] for name, spec in EXPERTS.items()},
    "default_device": "laptop",
}
CLASSES = {
    "interactive": {"bound_s": 0.5, "top_k": 1},
    "standard": {"bound_s": 2.0, "top_k": 2},
    "batch": {"bound_s": 60.0, "top_k": 4},
}


def _tokenizer_dir(out: Path) -> Path:
    from moekit.data import prepare_tokenizer, resolve_corpus, save_tokenizer, split_documents

    folder = out / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        docs = resolve_corpus(None, max_bytes=12_000_000)
        train_docs, _ = split_documents(docs, 0.05)
        save_tokenizer(prepare_tokenizer(train_docs, 4096, 3_000_000), folder)
    return folder


def stage_train(out: Path, steps: int, seconds: float) -> dict:
    from moekit.train import TrainConfig, train

    tok = _tokenizer_dir(out)
    log = {}
    for name, (overrides, globs, _device) in EXPERTS.items():
        corpus = [f"{STDLIB}/{g}/**/*.py" for g in globs] if globs else None
        cfg = TrainConfig(
            preset="moe-tiny",
            model_overrides=overrides,
            corpus=corpus,
            max_corpus_bytes=3_000_000,
            tokenizer_dir=str(tok),
            seq_len=128,
            batch_size=16,
            max_steps=steps,
            time_limit_s=seconds,
            warmup_steps=20,
            eval_interval=10_000,
            save_interval=10_000,
            out_dir=str(out / name),
        )
        t0 = time.perf_counter()
        result = train(cfg, progress=False)
        log[name] = {"seconds": round(time.perf_counter() - t0, 1), "final": str(result)[:200]}
        print(name, log[name], flush=True)
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def _plot(rows: dict, xkey: str, xlabel: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    styles = {
        "branch_and_bound": ("o-", 2.5),
        "branch_and_bound_slack": ("*-", 1.5),
        "exhaustive": ("k--", 1.2),
        "greedy_per_joule": ("s-", 1.2),
        "best_single": ("^-", 1.2),
        "random": ("x:", 1.2),
        "uniform_weights": ("d-.", 1.2),
    }
    for method, (style, width) in styles.items():
        pts = [(r[xkey], r[method]["nll"]) for r in rows if r[method]["experts"]]
        if pts:
            xs, ys = zip(*pts, strict=True)
            # Quality is a step function of the budget/bound: it changes only where a subset
            # becomes affordable, so the curve holds its value until the next point.
            ax.plot(xs, ys, style, lw=width, ms=4, label=method, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out NLL (nats/token, lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _plots(energy_rows: list, latency_rows: list, img: Path) -> None:
    _plot(
        energy_rows,
        "budget",
        "energy budget (J/token, all chosen experts together)",
        img / "mixture_energy.png",
        "MoE² on 4 experts: quality vs energy budget",
    )
    _plot(
        latency_rows,
        "bound_s",
        "latency bound (s for 64 prompt + 32 new tokens)",
        img / "mixture_latency.png",
        "MoE² on 4 experts: quality vs latency bound (energy unbounded)",
    )


def _row(results: dict, names: list[str]) -> dict:
    return {
        k: {
            "experts": [names[i] for i in r.subset],
            "nll": -r.value if r.subset else None,
            "energy": r.energy,
            "evaluations": r.evaluations,
        }
        for k, r in results.items()
        if k != "monotonicity"
    }


def stage_mixture(out: Path, img: Path, windows: int, val_windows: int) -> dict:
    from moekit.mixture import HardwareProfile, LatencyClass, load_mixture_config
    from moekit.mixture.fit import Scores
    from moekit.mixture.gate import MixtureGate
    from moekit.mixture.workflow import (
        load_scores,
        masking_table,
        profile_experts,
        select_experts,
        train_mixture,
    )

    torch.set_num_threads(1)
    paths = [str(out / name) for name in EXPERTS]
    hw = HardwareProfile.from_dict(HARDWARE)
    (out / "hardware.json").write_text(hw.to_json() + "\n")
    classes = {k: LatencyClass(**v) for k, v in CLASSES.items()}
    t0 = time.perf_counter()
    cfg = profile_experts(
        paths,
        list(EXPERTS),
        hw,
        prompt_tokens=64,
        new_tokens=32,
        repeats=3,
        latency_classes=classes,
        config_dir=out,
    )
    cfg.replace(default_class="standard").to_json(out / "mix.json")
    t_profile = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = train_mixture(
        out / "mix.json",
        out / "gate",
        num_windows=windows,
        num_val_windows=val_windows,
        embedding="hidden",
        embedder="net-s",
        steps=400,
    )
    t_train = time.perf_counter() - t0
    cfg, base = load_mixture_config(out / "mix.json")
    gate, val = load_scores(cfg, base)
    train_scores = Scores.load(out / "gate" / "train_scores.safetensors")
    gaps = masking_table(MixtureGate.load(out / "gate"), train_scores, val, steps=400)
    names = cfg.names
    energy = [e.energy_j_per_token for e in cfg.experts]
    lat = [e.latency_s(64, 32) for e in cfg.experts]
    # Every subset's energy is a breakpoint where the affordable family changes: one budget each.
    subsets = [[i for i in range(len(energy)) if m >> i & 1] for m in range(1, 2 ** len(energy))]
    budgets = sorted({round(sum(energy[i] for i in sub), 12) * (1 + 1e-9) for sub in subsets})
    hi = max(budgets)
    energy_rows = []
    for b in budgets:
        res = select_experts(cfg, gate, val, b)
        energy_rows.append({"budget": b, **_row(res, names)})
    mono = select_experts(cfg, gate, val, hi)["monotonicity"]
    bounds = sorted({x * 1.0001 for x in lat} | {min(lat) * 0.5})
    latency_rows = []
    for d in bounds:
        res = select_experts(cfg, gate, val, hi, latency_bound_s=d)
        latency_rows.append({"bound_s": d, **_row(res, names)})
    _plots(energy_rows, latency_rows, img)
    result = {
        "experts": [e.to_dict() for e in cfg.experts],
        "profile_s": round(t_profile, 1),
        "gate_train_s": round(t_train, 1),
        "gate": summary,
        "masking": [
            {
                "subset": [names[i] for i in g.subset],
                "masked": g.masked_nll,
                "retrained": g.retrained_nll,
                "gap": g.gap,
            }
            for g in gaps
        ],
        "monotonicity": {"pairs": mono.pairs, "violations": mono.violations, "max_drop": mono.max_drop},
        "energy_rows": energy_rows,
        "latency_rows": latency_rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [
        "| expert | device | prefill ms/token | decode ms/token | J/token | held-out NLL alone |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for e in r["experts"]:
        nll = r["gate"]["val_nll_per_expert"][e["name"]]
        lines.append(
            f"| {e['name']} | {e['device']} | {e['prefill_s_per_token'] * 1e3:.2f} | "
            f"{e['decode_s_per_token'] * 1e3:.2f} | {e['energy_j_per_token']:.4f} | {nll:.3f} |"
        )
    lines += [
        "",
        f"gate on all experts: NLL {r['gate']['val_nll_gate']:.4f}; uniform weights: "
        f"{r['gate']['val_nll_uniform']:.4f}",
        "",
        "| subset | masked | retrained | gap |",
        "|---|---:|---:|---:|",
    ]
    for g in r["masking"]:
        lines.append(
            f"| {','.join(g['subset'])} | {g['masked']:.4f} | {g['retrained']:.4f} | {g['gap']:+.4f} |"
        )
    m = r["monotonicity"]
    lines += [
        "",
        f"monotonicity of the masked objective: {m['violations']}/{m['pairs']} single additions lower "
        f"quality (largest drop {m['max_drop']:.4f} nats)",
        "",
    ]
    methods = [
        "branch_and_bound",
        "branch_and_bound_slack",
        "exhaustive",
        "greedy_per_joule",
        "best_single",
        "random",
        "uniform_weights",
    ]
    lines += ["| budget J/token | " + " | ".join(methods) + " |", "|---:|" + "---|" * len(methods)]
    for row in r["energy_rows"]:
        cells = []
        for k in methods:
            c = row[k]
            cells.append(
                "-"
                if c["nll"] is None
                else f"{c['nll']:.3f} ({c['evaluations']} ev; {'+'.join(c['experts'])})"
            )
        lines.append(f"| {row['budget']:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "| latency bound s | " + " | ".join(methods) + " |", "|---:|" + "---|" * len(methods)]
    for row in r["latency_rows"]:
        cells = []
        for k in methods:
            c = row[k]
            cells.append(
                "-"
                if c["nll"] is None
                else f"{c['nll']:.3f} ({c['evaluations']} ev; {'+'.join(c['experts'])})"
            )
        lines.append(f"| {row['bound_s']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stage_bridge(out: Path) -> dict:
    """Per-token decode time of ``all-l`` natively and through the text bridge (same tokenizer,
    so only the bridge's cost differs): 32 new tokens after prompts of 64 and 256 tokens."""
    from moekit.loader import load_model_and_tokenizer
    from moekit.mixture.bridge import BridgedSession, TextBridge
    from moekit.models.decode import DecodeSession

    torch.set_num_threads(1)
    m = load_model_and_tokenizer(out / "all-l")
    ids = m.tokenizer.encode(Path(__file__).read_text()).ids
    result = {}
    for length in (64, 256):
        times = {}
        for kind in ("native", "bridge"):
            if kind == "native":
                s = DecodeSession(m.model, torch.tensor([ids[:length]]), max_new_tokens=32)
            else:
                bridge = TextBridge(m.model, m.tokenizer, m.tokenizer, m.model.config.vocab_size)
                s = BridgedSession(bridge, ids[:length])
            x = s.prefill()
            t0 = time.perf_counter()
            for _ in range(32):
                x = s.step(x.argmax(-1))
            times[kind] = (time.perf_counter() - t0) / 32 * 1e3
        result[length] = times
        print(
            f"prompt {length}: native {times['native']:.2f} ms/token, bridge {times['bridge']:.2f} ms/token "
            f"({times['bridge'] / times['native']:.1f}x)"
        )
    return result


def stage_retrained(out: Path) -> dict:
    """Monotonicity of the *retrained* objective (a gate trained on each subset, the paper's
    setting) from ``results.json``: single experts alone, the masking table's retrained gates
    (subsets of 2 to E-1), and the all-experts gate."""
    r = json.loads((out / "results.json").read_text())
    names = [e["name"] for e in r["experts"]]
    q = {frozenset([n]): -r["gate"]["val_nll_per_expert"][n] for n in names}
    q |= {frozenset(g["subset"]): -g["retrained"] for g in r["masking"]}
    q[frozenset(names)] = -r["gate"]["val_nll_gate"]
    pairs, drops = 0, []
    for subset, value in q.items():
        for j in set(names) - subset:
            if subset | {j} in q:
                pairs += 1
                if value - q[subset | {j}] > 1e-9:
                    drops.append((sorted(subset), j, value - q[subset | {j}]))
    for subset, j, d in drops:
        print(f"{'+'.join(subset)} + {j}: quality drops by {d:.4f} nats")
    print(f"retrained objective: {len(drops)}/{pairs} single additions lower quality")
    return {"pairs": pairs, "violations": len(drops), "max_drop": max((d for *_, d in drops), default=0.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--stage", choices=["train", "mixture", "all", "bridge", "retrained", "plot"], required=True
    )
    p.add_argument("--out", default="runs/bench_mixture", help="where the experts and results go")
    p.add_argument("--img", default="docs/img", help="where the plots go")
    p.add_argument("--steps", type=int, default=300, help="training steps per expert (train stage)")
    p.add_argument("--seconds", type=float, default=45.0, help="time limit per expert (train stage)")
    p.add_argument("--windows", type=int, default=384, help="gate training windows (mixture stage)")
    p.add_argument("--val-windows", type=int, default=256, help="held-out windows that score subsets")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("train", "all"):
        stage_train(out, args.steps, args.seconds)
    if args.stage in ("mixture", "all"):
        stage_mixture(out, Path(args.img), args.windows, args.val_windows)
    if args.stage == "bridge":
        stage_bridge(out)
    if args.stage == "retrained":
        stage_retrained(out)
    if args.stage == "plot":  # redraw the plots from results.json
        r = json.loads((out / "results.json").read_text())
        _plots(r["energy_rows"], r["latency_rows"], Path(args.img))


if __name__ == "__main__":
    main()
