"""``moekit quantize``: weight-only quantization of a model folder (uniform or mixed per expert)."""

from __future__ import annotations

import argparse
import json

from moekit.cli.common import load_model_and_tokenizer

HELP = "Quantize a model's experts (and optionally other linears) to 8/4/3/2 bits; --mixed solves per-expert widths."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    p.add_argument("--model", required=True, help="a run folder, a checkpoint folder or a model folder")
    p.add_argument("--out", required=True, help="folder to write the quantized model to")
    p.add_argument(
        "--bits", type=int, default=4, help="bit width (2, 3, 4 or 8); with --mixed, the non-expert width"
    )
    p.add_argument("--method", default="rtn", help="rtn or gptq (gptq needs calibration text)")
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="columns per scale/zero point (default 128; 32 is q4_0/q8_0's block)",
    )
    p.add_argument(
        "--include-non-experts", action="store_true", help="also quantize attention, dense FFNs and lm_head"
    )
    p.add_argument("--mixed", action="store_true", help="one width per expert from a MILP under --avg-bits")
    p.add_argument(
        "--avg-bits", type=float, default=2.5, help="--mixed budget: stored bits per expert weight"
    )
    p.add_argument(
        "--candidate-bits", default="1,2,3", help="--mixed: comma-separated widths (MC-MoE: 1,2,3)"
    )
    p.add_argument(
        "--objective",
        choices=["block_output", "expert_mse"],
        default="block_output",
        help="--mixed: measured error (MC-MoE: the MoE block's output change)",
    )
    p.add_argument(
        "--calib",
        action="append",
        help="calibration corpus: files, folders or globs (default: the run's train split)",
    )
    p.add_argument(
        "--calib-batches", type=int, default=8, help="calibration batches of 4 x --calib-seq-len tokens"
    )
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument(
        "--kernel",
        default="auto",
        choices=["auto", "native", "exact", "dequant"],
        help="auto: fastest measured CPU kernels (native where it fits); native: moekit's VNNI kernel; exact: kernels that run the stored codes; dequant: float matmul",
    )


def run(args: argparse.Namespace) -> int:
    """Loads, calibrates if needed, quantizes, writes ``--out`` (with the tokenizer) and prints a JSON summary."""
    import shutil
    from pathlib import Path

    from moekit.compress import (
        MixedPrecisionConfig,
        QuantConfig,
        allocate_bits,
        mixed_precision_stats,
        model_bytes,
        quantize_model,
        save_quantized,
    )
    from moekit.compress.config import check_bits, check_method

    check_bits(args.bits, "--bits")
    check_method(args.method, "--method")
    model, tok, folder = load_model_and_tokenizer(args.model)
    if getattr(model, "quant_config", None) is not None:
        raise ValueError(f"{folder} is already quantized; quantize the float model")
    batches = None
    if args.mixed or args.method == "gptq":
        from moekit.cli.common import evaluation_tokens
        from moekit.data import eval_batches

        tokens = evaluation_tokens(tok, folder, args.calib, split="train")
        batches = eval_batches(tokens, args.calib_seq_len, 4, args.calib_batches)
    expert_bits = None
    summary: dict = {}
    if args.mixed:
        cands = tuple(int(b) for b in args.candidate_bits.split(","))
        mcfg = MixedPrecisionConfig(
            avg_bits=args.avg_bits, candidate_bits=cands, group_size=args.group_size, objective=args.objective
        )
        stats = mixed_precision_stats(model, batches, mcfg)
        alloc = allocate_bits(stats, mcfg)
        expert_bits = alloc.bits
        summary["allocation"] = {"bits": alloc.bits, "avg_bits": round(alloc.avg_bits, 4), "cost": alloc.cost}
    before = model_bytes(model)["stored"]
    qcfg = QuantConfig(
        bits=args.bits,
        method=args.method,
        group_size=args.group_size,
        include_non_experts=args.include_non_experts,
        expert_bits=expert_bits,
        kernel=args.kernel,
    )
    quantize_model(model, qcfg, batches)
    save_quantized(model, args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, Path(args.out) / name)
    summary.update({"out": args.out, "bytes_before": before, "bytes_after": model_bytes(model)["stored"]})
    print(json.dumps(summary))
    return 0
