"""``moekit mixture profile|train|select|generate``: MoE², a gated mixture of whole models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "Mixtures of whole models (MoE²): profile experts, train the gate, select under budgets, generate."


def _add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, help="an expert folder (repeat per expert)")
    p.add_argument("--names", help="comma-separated expert names (default: the folder names)")
    p.add_argument(
        "--hardware", help="hardware-profile JSON (devices with watts or J/token; see docs/mixture.md)"
    )
    p.add_argument(
        "--latency-class",
        action="append",
        default=[],
        metavar="NAME=SECONDS[:TOPK]",
        help="a request class and its latency bound, e.g. interactive=0.5:2 (repeatable)",
    )
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length to time the prefill on")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to time the decode on")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per expert (best is kept)")
    p.add_argument("--out", required=True, help="the mixture config JSON to write")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the mixture config (`moekit mixture profile --out`)")
    p.add_argument("--out", required=True, help="folder for the gate (the config is pointed at it)")
    p.add_argument(
        "--corpus",
        action="append",
        help="text (default: the Python stdlib); only its held-out split (moekit train's) is used",
    )
    p.add_argument("--val-fraction", type=float, default=0.05, help="the held-out split, as in moekit train")
    p.add_argument("--windows", type=int, default=256, help="training windows")
    p.add_argument("--val-windows", type=int, default=128, help="held-out windows (what select scores)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per window (the gate's input)")
    p.add_argument("--cont-len", type=int, default=32, help="continuation tokens scored per window")
    p.add_argument("--embedder", help="expert whose embeddings feed the gate (default: the first)")
    p.add_argument(
        "--embedding", choices=["tokens", "hidden"], default="tokens", help="prompt embedding kind"
    )
    p.add_argument("--hidden-dim", type=int, default=64, help="gate hidden width")
    p.add_argument("--steps", type=int, default=300, help="gate training steps (full batch)")
    p.add_argument("--seed", type=int, default=0)


def _add_select(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a mixture config with a trained gate")
    p.add_argument("--energy-budget", type=float, required=True, help="J per token for the whole subset")
    p.add_argument("--method", default="branch_and_bound", help="method whose subset --write stores")
    p.add_argument("--latency-bound", type=float, help="only experts whose predicted latency fits (s)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="request shape for --latency-bound")
    p.add_argument("--new-tokens", type=int, default=32, help="request shape for --latency-bound")
    p.add_argument("--slack", type=float, default=0.0, help="branch and bound: allowed drop per added expert")
    p.add_argument("--write", action="store_true", help="store the subset and budget in the config")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the mixture config")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--latency-class", help="request class (default: the config's default_class)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aggregation", choices=["mixture", "best"], help="override the config's aggregation")


SUBVERBS = {
    "profile": ("Measure each expert's latency, price its energy, write the mixture config.", _add_profile),
    "train": ("Train the gate on held-out text to minimise the mixture's NLL.", _add_train),
    "select": (
        "Choose the expert subset under an energy budget (branch and bound and baselines).",
        _add_select,
    ),
    "generate": ("Generate with the gated mixture, choosing experts by latency class.", _add_generate),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the sub-verbs."""
    sub = p.add_subparsers(dest="mixture_verb", metavar="SUBVERB", required=True)
    for name, (text, add) in SUBVERBS.items():
        sp = sub.add_parser(name, help=text, description=text)
        add(sp)


def _classes(specs: list[str]) -> dict:
    from moekit.mixture import LatencyClass

    out = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        bound, _, k = rest.partition(":")
        try:
            out[name] = LatencyClass(bound_s=float(bound), top_k=int(k) if k else 2)
        except ValueError as err:
            raise ValueError(f"--latency-class {spec!r}: {err} (write NAME=SECONDS[:TOPK])") from None
        if not sep or not name:
            raise ValueError(f"--latency-class {spec!r}: write NAME=SECONDS[:TOPK]")
    return out


def _profile(args) -> int:
    from moekit.mixture import HardwareProfile
    from moekit.mixture.workflow import profile_experts

    hardware = None
    if args.hardware:
        try:
            hardware = HardwareProfile.from_json(args.hardware)
        except json.JSONDecodeError as err:
            raise ValueError(f"{args.hardware}: not valid JSON ({err})") from None
    names = args.names.split(",") if args.names else None
    classes = _classes(args.latency_class)
    cfg = profile_experts(
        args.model,
        names,
        hardware,
        args.prompt_tokens,
        args.new_tokens,
        args.repeats,
        classes,
        config_dir=Path(args.out).parent,
    )
    if classes:
        cfg = cfg.replace(default_class=next(iter(classes)))
    cfg.to_json(args.out)
    for e in cfg.experts:
        print(
            f"{e.name:>16}  prefill {e.prefill_s_per_token * 1e3:.3f} ms/token  decode "
            f"{e.decode_s_per_token * 1e3:.3f} ms/token  {e.energy_j_per_token:.4f} J/token ({e.device})"
        )
    print(f"moekit mixture profile: wrote {args.out}", file=sys.stderr)
    return 0


def _train(args) -> int:
    from moekit.mixture.workflow import train_mixture

    summary = train_mixture(
        args.config,
        args.out,
        corpus=args.corpus,
        num_windows=args.windows,
        num_val_windows=args.val_windows,
        prompt_len=args.prompt_len,
        cont_len=args.cont_len,
        embedder=args.embedder,
        embedding=args.embedding,
        hidden_dim=args.hidden_dim,
        steps=args.steps,
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _select(args) -> int:
    from moekit.mixture import load_mixture_config
    from moekit.mixture.workflow import load_scores, select_experts

    cfg, base = load_mixture_config(args.config)
    gate, scores = load_scores(cfg, base)
    results = select_experts(
        cfg,
        gate,
        scores,
        args.energy_budget,
        latency_bound_s=args.latency_bound,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        slack=args.slack,
    )
    if args.method not in results or args.method == "monotonicity":
        raise ValueError(
            f"--method {args.method!r} is not one of {sorted(k for k in results if k != 'monotonicity')}"
        )
    mono = results.pop("monotonicity", None)
    rows = {
        k: {
            "experts": [cfg.names[i] for i in r.subset],
            "nll": -r.value,
            "energy_j_per_token": r.energy,
            "evaluations": r.evaluations,
        }
        for k, r in results.items()
    }
    if mono is not None:
        rows["monotonicity"] = {
            "pairs": mono.pairs,
            "violations": mono.violations,
            "max_drop": mono.max_drop,
            "sampled": mono.sampled,
        }
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for k, r in rows.items():
            if k == "monotonicity":
                print(
                    f"monotonicity: {r['violations']}/{r['pairs']} additions lower q (max drop {r['max_drop']:.4g})"
                )
                continue
            print(
                f"{k:>18}  nll {r['nll']:.4f}  {r['energy_j_per_token']:.4f} J/token  "
                f"{r['evaluations']:>4} evaluations  {','.join(r['experts']) or '(none affordable)'}"
            )
    chosen = results[args.method]
    if args.write:
        if not chosen.subset:
            raise ValueError(
                f"no expert fits the energy budget {args.energy_budget} J/token; nothing written"
            )
        cfg.replace(
            selected=[cfg.names[i] for i in chosen.subset], energy_budget_j_per_token=args.energy_budget
        ).to_json(args.config)
        print(
            f"moekit mixture select: wrote selected={rows[args.method]['experts']} to {args.config}",
            file=sys.stderr,
        )
    return 0


def _generate(args) -> int:
    import torch

    from moekit.mixture import Mixture
    from moekit.models.generation import Sampler

    mixture = Mixture.load(args.config)
    if args.aggregation:
        mixture.config = mixture.config.replace(aggregation=args.aggregation)
    sampler = Sampler(temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed))
    text, choice = mixture.generate(args.prompt, args.max_new_tokens, args.latency_class, sampler)
    print(args.prompt + text)
    print(f"moekit mixture generate: {json.dumps(choice.as_dict())}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatches to the sub-verb."""
    return {"profile": _profile, "train": _train, "select": _select, "generate": _generate}[
        args.mixture_verb
    ](args)
