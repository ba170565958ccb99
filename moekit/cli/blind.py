"""``moekit blind``: blind side-by-side evaluation (make, rate, unblind, judge). See docs/blind.md."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "Blind side-by-side evaluation: make anonymised pairs, rate them in a browser, judge, unblind."

SPEC_HELP = (
    "a model folder plus generation options: PATH[:key=value,...] (keys: name, decode=greedy|sample|scmoe, "
    "temperature, top_k, top_p, seed, max_new_tokens, scmoe_alpha, scmoe_beta, scmoe_weak, k, dtype), "
    "or a JSON file with those fields and 'model'"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the four sub-verbs and their flags."""
    sub = p.add_subparsers(dest="blind_cmd", metavar="STEP")
    sub.required = True
    m = sub.add_parser(
        "make",
        help="both systems answer every prompt; write shuffled, anonymised pairs and a sealed key",
        description="Both systems answer every prompt; writes pairs.jsonl, the sealed key.json and manifest.json.",
    )
    m.add_argument("--a", required=True, metavar="SPEC", help="system A (the candidate): " + SPEC_HELP)
    m.add_argument("--b", required=True, metavar="SPEC", help="system B (the baseline), same syntax")
    m.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="SPEC",
        help="a further system (repeatable): every pair of systems meets on every prompt",
    )
    m.add_argument(
        "--prompts",
        required=True,
        help="JSONL ('prompt' or 'instruction' field, optional 'id') or one prompt a line",
    )
    m.add_argument("--out", required=True, help="new folder for the blind comparison")
    m.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for order and sides (default: random; recorded in the key only)",
    )

    r = sub.add_parser(
        "rate",
        help="serve the rating page on 127.0.0.1",
        description="Serves the rating page on 127.0.0.1 (the key is never read).",
    )
    r.add_argument("dir", help="a folder written by `moekit blind make`")
    r.add_argument("--rater", default=None, help="rate as this id only (default: the page asks each rater)")
    r.add_argument("--port", type=int, default=8765, help="TCP port on 127.0.0.1 (0 picks a free one)")
    r.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="start even if a ratings file has bad lines (their complete lines count)",
    )

    u = sub.add_parser(
        "unblind",
        help="apply the key; write report.md, plot.png, FastChat battles, alpaca_eval JSON",
        description="Applies the sealed key and writes the report, plot, FastChat battle rows and alpaca_eval JSON.",
    )
    u.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="one or more blind folders (several: their systems are pooled, e.g. for Bradley-Terry)",
    )
    u.add_argument("--out", default=None, help="output folder (default DIR/unblind)")
    u.add_argument(
        "--rater", action="append", default=None, help="use only this rater's file (repeatable; default all)"
    )
    u.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="use the complete lines of a ratings file with bad lines",
    )
    u.add_argument("--bootstrap", type=int, default=200, help="Bradley-Terry bootstrap resamples")
    u.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    j = sub.add_parser(
        "judge",
        help="fill in ratings with an automatic judge, both orders",
        description="Judges every pair in both orders with a function hook or a third model's log-likelihood.",
    )
    j.add_argument("dir", help="a folder written by `moekit blind make`")
    j.add_argument(
        "--judge",
        required=True,
        metavar="JUDGE",
        help="fn:package.module:function or loglik:MODEL_DIR[:margin=M]",
    )
    j.add_argument(
        "--name", default=None, help="rater id for the judge's ratings file (default from the spec)"
    )


def _make(args) -> int:
    from moekit.blind import make_blind, parse_spec, read_prompts

    specs = [parse_spec(s) for s in [args.a, args.b, *args.also]]
    prompts = read_prompts(args.prompts)
    out = make_blind(specs, prompts, args.out, seed=args.seed)
    n = len(prompts) * len(specs) * (len(specs) - 1) // 2
    print(f"wrote {n} pairs of {len(specs)} systems to {out} (key sealed in {out / 'key.json'})")
    return 0


def _rate(args) -> int:
    from moekit.blind.server import RatingStore, make_server

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0-65535, got {args.port}")
    store = RatingStore(args.dir, args.rater, args.skip_bad_lines)
    try:
        server = make_server(store, args.port)
    except OSError as e:
        raise ValueError(f"cannot listen on 127.0.0.1:{args.port}: {e.strerror}") from None
    host, port = server.server_address[:2]
    print(
        f"rating {len(store.pairs)} pairs of {args.dir}: open http://{host}:{port}/ (Ctrl-C stops; every click is saved)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _unblind(args) -> int:
    from moekit.blind import write_unblind

    out, result = write_unblind(
        args.dirs,
        args.out,
        args.rater,
        args.skip_bad_lines,
        warn=lambda m: print(f"moekit blind: warning: {m}", file=sys.stderr),
        num_resamples=args.bootstrap,
        seed=args.seed,
    )
    for h in result["head_to_head"]:
        d = h["dropped"]
        print(
            f"{h['a']} vs {h['b']}: {h['wins']} wins, {h['losses']} losses, {h['ties']} ties; "
            f"win rate (ties dropped) {d['rate']:.3f} [{d['low']:.3f}, {d['high']:.3f}], sign test p={d['p']:.4g}"
        )
    print(f"report: {out / 'report.md'}")
    return 0


def _judge(args) -> int:
    from moekit.blind import judge_folder, parse_judge

    name, judge = parse_judge(args.judge)
    summary = judge_folder(args.dir, judge, args.name or name, args.judge)
    print(json.dumps(summary))
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs the chosen step."""
    return {"make": _make, "rate": _rate, "unblind": _unblind, "judge": _judge}[args.blind_cmd](args)
