"""docs/papers.md rows on expert pruning, pyramids and compression (run through ``benchmarks/paper_rows.py``):

    python benchmarks/paper_rows.py prune   # multitask paper: prune 8 -> 4 experts by usage vs at random
    python benchmarks/paper_rows.py prmoe   # PR-MoE pyramid vs standard MoE at matched active compute
    python benchmarks/paper_rows.py mcmoe   # MC-MoE: MILP vs uniform vs random bits; ODP skipped share
    python benchmarks/paper_rows.py edgemoe # EdgeMoE: eviction hit rates and predictor accuracy
    python benchmarks/paper_rows.py edgemoe-tolerance # EdgeMoE: bit-width search, size vs loss
    python benchmarks/paper_rows.py moextend # MoExtend: router-tuning layer choice vs data shift vs all

All on byte-level models trained here on the Python stdlib source (``paper_rows._data``/``_train``).

``prune``: the top-2 MoE of ``paper_rows_trained`` (dim 64, 4 layers, 8 experts of width 64) is
trained, then every MoE layer is cut to 4 experts by ``moekit.surgery.prune_experts``: by tokens
routed (``metric="tokens"``) and by gate mass on 16 training batches, and at random (3 seeds).
No fine-tuning after pruning. The paper's claim: usage-based pruning loses little (and less than random).

``prmoe``: PR-MoE (residual MoE: a dense MLP plus one top-1 expert, MoE in layers 1 and 3, a
pyramid of 4 then 8 experts; ``prmoe_small``'s layout scaled to dim 64, expert width 64) against a
standard top-2 MoE with 8 experts in the same layers (the same active FFN compute: two width-64
FFNs per token in an MoE layer) and against a residual MoE without the pyramid (8 and 8), same
steps, same batches. The paper's claim: PR-MoE matches the standard MoE with fewer parameters.

``mcmoe``: on the trained model of ``prune``, the experts are quantized with GPTQ (group 64) at
MC-MoE's widths {1, 2, 3}: uniform 2 bits; the MILP (``allocate_bits`` with MC-MoE's defaults, the
budget equal to uniform 2 bits' stored bits); and random allocations with the MILP's widths shuffled
within each layer (the same bits). Then ODP (``dynamic_prune``) on the float model at several
thresholds (MC-MoE's protection of the top 2% of tokens): skipped expert calls vs loss change.

``edgemoe``: the trained model of ``prune`` is traced on the held-out windows; the trace is replayed
token by token (``moekit.offload.simulate.replay``) with caches of 4 to 24 of the 32 experts under
``lru``, ``lfu``, ``edgemoe`` (frequency x how soon the layer runs) and Belady. EdgeMoE's
second-order predictor (``SecondOrderTransitions``, fitted on 32 training batches) predicts 2
experts of the next layer; reported: the share of the experts used there that it covers, against
first order and against the next layer's 2 most used experts.

``edgemoe-tolerance``: on the trained model of ``prune``, EdgeMoE's bit-width search
(``bitwidth_search`` over widths {2, 4, 8, 32}, RTN with groups of 64 = one row) is run at several
tolerances P; the score is minus the loss (nats per byte) on 4 training batches, so P is in nats.
Reported: average width of the expert weights (32 = float; scales not counted), their stored size,
and the held-out loss, beside all-float and uniform RTN 8 / 4 / 2 bits.

``moextend``: the trained model of ``prune`` (old task: Python source) is extended with one new
expert per chosen layer for 2-digit addition lines (``paper_rows_trained._addition_data``), then
only the new experts, router rows and calibration modules train for ``steps // 2`` steps:
MoExtend's layer choice (router tuning, ``std(q - p)``, top half), the data-shift choice, and all
layers. Reported: old-task and new-task held-out loss.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from moekit.layers import MoEConfig
from moekit.models import ModelConfig, MoEForCausalLM


def _loss(model, val: list) -> float:
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for b in val:
            logits = model(b[:, :-1]).logits
            total += float(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum")
            )
            count += b[:, 1:].numel()
    return total / count


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _trained(steps: int, seed: int):
    from paper_rows import _data, _train
    from paper_rows_trained import _moe_model

    train, val = _data(steps, seed)
    model = _moe_model(seed)
    _train(model, train, steps)
    return model, train, val


def prune(steps: int, seed: int) -> None:
    """Prints the usage-pruning table (markdown)."""
    from paper_rows import BATCH, SEQ

    from moekit.surgery.prune import PruneConfig, prune_experts

    t0 = time.perf_counter()
    model, train, val = _trained(steps, seed)
    calib = list(train[:16])
    rows = [("unpruned (8 experts per layer)", _loss(model, val), _params(model))]
    for metric in ("tokens", "gate_mass"):
        pruned = prune_experts(model, PruneConfig(num_keep=4, metric=metric), calib)
        rows.append((f"keep 4 by usage ({metric})", _loss(pruned, val), _params(pruned)))
    rand = []
    for s in range(3):
        pruned = prune_experts(model, PruneConfig(num_keep=4, metric="random", seed=s))
        rand.append(_loss(pruned, val))
        rows.append((f"keep 4 at random (seed {s})", rand[-1], _params(pruned)))
    print(
        f"seed {seed}: {steps} steps x {BATCH} x {SEQ} bytes; usage on 16 training batches; "
        f"{len(val)} x {BATCH} held-out windows; no fine-tuning after pruning; {time.perf_counter() - t0:.0f} s"
    )
    print("| model | parameters | held-out loss | change |")
    print("|---|---|---|---|")
    for name, loss, params in rows:
        print(f"| {name} | {params / 1e3:.0f}k | {loss:.4f} | {loss - rows[0][1]:+.4f} |")
    print(f"random mean {sum(rand) / len(rand):.4f}")


def _prmoe_model(seed: int, kind: str) -> MoEForCausalLM:
    from paper_rows_trained import BASE

    torch.manual_seed(seed)
    if kind == "standard":
        moe = MoEConfig(dim=64, ffn_dim=64, num_experts=8, top_k=2)
        extra = {}
    else:
        moe = MoEConfig(dim=64, ffn_dim=64, num_experts=8, top_k=1, norm_topk_prob=False, residual_moe=True)
        extra = {"experts_per_layer": (4, 8) if kind == "pyramid" else (8, 8)}
    # the residual MoE's dense MLP has the expert width, so a token runs 2 width-64 FFNs either way
    cfg = ModelConfig(**BASE, moe=moe, moe_placement="every_other", aux_loss_coef=0.01, **extra)
    return MoEForCausalLM(cfg)


def prmoe(steps: int, seed: int) -> None:
    """Prints the PR-MoE table (markdown)."""
    from paper_rows import BATCH, SEQ, _data, _train

    train, val = _data(steps, seed)
    print(
        f"seed {seed}: {steps} steps x {BATCH} x {SEQ} bytes, same batches; {len(val)} x {BATCH} held-out windows"
    )
    print("| model | parameters | held-out loss | seconds |")
    print("|---|---|---|---|")
    for name, kind in (
        ("standard MoE (top-2, 8 + 8 experts)", "standard"),
        ("PR-MoE (residual top-1, pyramid 4 + 8)", "pyramid"),
        ("residual MoE, no pyramid (top-1, 8 + 8)", "residual"),
    ):
        model = _prmoe_model(seed, kind)
        t0 = time.perf_counter()
        _train(model, train, steps)
        print(
            f"| {name} | {_params(model) / 1e3:.1f}k | {_loss(model, val):.4f} | {time.perf_counter() - t0:.0f} |"
        )


def mcmoe(steps: int, seed: int) -> None:
    """Prints the MC-MoE tables (markdown)."""
    from moekit.compress import (
        MixedPrecisionConfig,
        QuantConfig,
        allocate_bits,
        dynamic_prune,
        expert_calls_saved,
        quantize_model,
        uniform_allocation,
    )
    from moekit.compress import PruneConfig as OdpConfig
    from moekit.compress.mixed import mixed_precision_stats

    t0 = time.perf_counter()
    model, train, val = _trained(steps, seed)
    calib = list(train[:16])
    base = _loss(model, val)
    cfg = MixedPrecisionConfig(avg_bits=3.0, group_size=64)
    stats = mixed_precision_stats(model, calib, cfg)
    uni = uniform_allocation(stats, 2, 64)
    cfg = MixedPrecisionConfig(avg_bits=uni.avg_bits, group_size=64)
    milp = allocate_bits(stats, cfg)
    allocs = [("uniform 2 bits", uni.bits, uni.avg_bits), ("MILP (MC-MoE PMQ)", milp.bits, milp.avg_bits)]
    gen = torch.Generator().manual_seed(seed)
    for s in range(3):
        shuffled = [
            [layer[i] for i in torch.randperm(len(layer), generator=gen).tolist()] for layer in milp.bits
        ]
        allocs.append((f"random (MILP widths shuffled, {s})", shuffled, milp.avg_bits))
    print(
        f"seed {seed}: {steps} steps; float held-out loss {base:.4f} (ppl {math.exp(base):.3f}); training and stats {time.perf_counter() - t0:.0f} s"
    )
    print("| allocation | stored bits per expert weight | widths per layer | held-out loss | ppl |")
    print("|---|---|---|---|---|")
    for name, bits, avg in allocs:
        q = quantize_model(
            copy.deepcopy(model), QuantConfig(method="gptq", group_size=64, expert_bits=bits), calib
        )
        loss = _loss(q, val)
        widths = " / ".join("".join(str(b) for b in layer) for layer in bits)
        print(f"| {name} | {avg:.3f} | {widths} | {loss:.4f} | {math.exp(loss):.3f} |")
    print("\n| ODP threshold | expert calls skipped | held-out loss | change |")
    print("|---|---|---|---|")
    for thr in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8):
        pruned = dynamic_prune(copy.deepcopy(model), OdpConfig(threshold=thr, protect_top=0.02))
        with torch.no_grad():
            saved = [expert_calls_saved(pruned(b[:, :-1]).routing) for b in val]
        loss = _loss(pruned, val)
        print(f"| {thr} | {sum(saved) / len(saved):.3f} | {loss:.4f} | {loss - base:+.4f} |")


def _accuracy(trans, trace, order: int) -> float:
    """Share of the next layer's used experts that the 2-expert prediction covers (recall), over
    tokens and layer pairs of ``trace``; ``order`` 0 predicts the next layer's 2 most used experts."""
    ids = [t.tolist() for t in trace.expert_ids]
    hit = total = 0
    for li in range(trace.num_layers - 1):
        if order == 0:
            top2 = [int(j) for j in trans.first[li].sum(0).argsort(descending=True)[:2]]
        for t in range(trace.num_tokens):
            a = ids[li][t][0]
            b = ids[li - 1][t][0] if (order == 2 and li >= 1) else None
            pred = set(top2 if order == 0 else trans.predict(li, a, b, 2))
            used = [e for e in ids[li + 1][t] if e >= 0]
            hit += sum(e in pred for e in used)
            total += len(used)
    return hit / total


def edgemoe(steps: int, seed: int) -> None:
    """Prints the EdgeMoE tables (markdown): eviction hit rates and predictor accuracy."""
    from moekit.analysis import record_trace
    from moekit.compress.edgemoe import SecondOrderTransitions
    from moekit.offload.simulate import HardwareProfile, belady_hit_rate, replay

    t0 = time.perf_counter()
    model, train, val = _trained(steps, seed)
    with torch.no_grad():
        held = record_trace(model, [(b, None) for b in torch.cat(val).split(16)], "held-out")
        fit_trace = record_trace(model, [(b, None) for b in train[:32]], "train")
    print(
        f"seed {seed}: {steps} steps; held-out trace {held.num_tokens} tokens x {held.num_layers} MoE "
        f"layers x 8 experts (top-2), replayed token by token; {time.perf_counter() - t0:.0f} s"
    )
    print("| cache (experts of 32) | lru | lfu | edgemoe | belady (optimal) |")
    print("|---|---|---|---|---|")
    hw = HardwareProfile(storage_bw=1e9, mem_bw=1e10)
    for entries in (4, 8, 12, 16, 24):
        rates = [replay(held, entries, 1, hw, policy=p).hit_rate for p in ("lru", "lfu", "edgemoe")]
        cells = " | ".join(f"{r:.3f}" for r in rates)
        print(f"| {entries} | {cells} | {belady_hit_rate(held, entries):.3f} |")
    trans = SecondOrderTransitions.fit(fit_trace.expert_ids, fit_trace.num_experts)
    print(
        f"\npredictor fitted on {fit_trace.num_tokens} training tokens; 2 experts predicted per token and layer"
    )
    print("| predictor | held-out recall of the next layer's experts |")
    print("|---|---|")
    for name, order in (
        ("next layer's 2 most used (no conditioning)", 0),
        ("first order P(e_l+1 given e_l)", 1),
    ):
        print(f"| {name} | {_accuracy(trans, held, order):.3f} |")
    print(f"| second order P(e_l+1 given e_l, e_l-1) (EdgeMoE) | {_accuracy(trans, held, 2):.3f} |")


def edgemoe_tolerance(steps: int, seed: int) -> None:
    """Prints the EdgeMoE tolerance sweep (markdown): size vs held-out loss per tolerance."""
    from moekit.compress.calibrate import moe_layers
    from moekit.compress.edgemoe import BitwidthSearchConfig, bitwidth_search, fake_quantized

    t0 = time.perf_counter()
    model, train, val = _trained(steps, seed)
    calib = list(train[:4])
    group = 64
    counts = [layer.config.num_experts for layer in moe_layers(model)]
    per_expert = sum(w.numel() for w in moe_layers(model)[0].experts.expert_tensors(0))
    cache: dict[tuple, float] = {}

    def score(bits: list[list[int]]) -> float:
        # the search is deterministic, so the baseline and importance probes repeat across tolerances
        key = tuple(map(tuple, bits))
        if key not in cache:
            cache[key] = -_loss(fake_quantized(model, bits, group), calib)
        return cache[key]

    def row(name: str, bits: list[list[int]], extra: str) -> None:
        flat = [b for layer in bits for b in layer]
        avg = sum(flat) / len(flat)
        kib = sum(per_expert * b / 8 for b in flat) / 1024
        loss = _loss(fake_quantized(model, bits, group), val)
        widths = " / ".join("".join("F" if b == 32 else str(b) for b in layer) for layer in bits)
        print(f"| {name} | {avg:.2f} | {kib:.1f} | {widths} | {loss:.4f} | {extra} |")

    print(
        f"seed {seed}: {steps} steps; {len(counts)} MoE layers x {counts[0]} experts of {per_expert} weights; "
        f"search scored on {len(calib)} x 16 training windows, reported on {len(val)} x 16 held-out windows; "
        f"training {time.perf_counter() - t0:.0f} s"
    )
    print(
        "| configuration | avg bits per expert weight | expert KiB | widths per layer (F = float) "
        "| held-out loss | calib drop / evaluations |"
    )
    print("|---|---|---|---|---|---|")
    for b in (32, 8, 4, 2):
        row("all float" if b == 32 else f"uniform {b} bits", [[b] * n for n in counts], "-")
    for tol in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1):
        res = bitwidth_search(score, counts, BitwidthSearchConfig(tolerance=tol, group_size=group))
        row(f"EdgeMoE search, P = {tol}", res.bits, f"{res.baseline - res.score:.4f} / {res.evaluations}")
    print(f"{len(cache)} distinct configurations scored; {time.perf_counter() - t0:.0f} s")


def moextend(steps: int, seed: int) -> None:
    """Prints the MoExtend table (markdown): old (code) and new (addition) task loss."""
    from paper_rows_trained import _addition_data

    from moekit.surgery.common import train_steps
    from moekit.surgery.extend import EXTENSION_FREEZE, ExtendConfig, extend_experts, extended_layers

    t0 = time.perf_counter()
    model, _, val = _trained(steps, seed)
    ext_steps = steps // 2
    new_train, _ = _addition_data(ext_steps, 32, 2, seed + 1)
    new_val, _ = _addition_data(8, 32, 2, seed + 2)
    rows = [("trained MoE (before)", "-", _loss(model, val), _loss(model, new_val))]
    for name, cfg in (
        ("MoExtend (router-tuning shift, calibration)", ExtendConfig.moextend(seed=seed)),
        ("data shift (earlier moekit variant)", ExtendConfig.moextend(shift_source="data", seed=seed)),
        ("all layers", ExtendConfig.moextend(layers="all", seed=seed)),
    ):
        ext = extend_experts(model, cfg, new_data=new_train[:8], old_data=val[:4])
        layers = extended_layers(ext)
        train_steps(ext, new_train, ext_steps, lr=3e-3, freeze=EXTENSION_FREEZE, seed=seed)
        rows.append((name, str(layers), _loss(ext, val), _loss(ext, new_val)))
    print(
        f"seed {seed}: base {steps} steps on stdlib bytes; extension: 1 new expert per chosen layer, "
        f"{ext_steps} steps x 32 rows of 2-digit addition lines (new experts, rows and calibration only); "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print("| model | extended layers | old-task (code) loss | new-task (addition) loss |")
    print("|---|---|---|---|")
    for name, layers, old, new in rows:
        print(f"| {name} | {layers} | {old:.4f} | {new:.4f} |")
