"""docs/papers.md rows measured on MoE models trained here (run through ``benchmarks/paper_rows.py``):

    python benchmarks/paper_rows.py scmoe     # SCMoE vs greedy, exact match on synthetic addition
    python benchmarks/paper_rows.py moepp     # MoE++ vs vanilla MoE: loss and MoE-layer throughput
    python benchmarks/paper_rows.py moetuner  # MoETuner ILP placement vs round-robin on a trace

``scmoe``: a byte-level top-2 MoE (dim 64, 4 layers, 8 experts of width 64) is trained on lines
``"aa+bb=ccc\\n"`` (``--digits`` operand digits, zero-padded; the sum one digit wider), with 300
random pairs held out of training. Each held-out prompt ``"aa+bb="`` is completed with the answer's
bytes by greedy decoding and by SCMoE (``SelfContrastSession``, alpha 0.1, weak ``rank:3`` and ``top:1``) at several betas;
score = exact match of the answer bytes. The paper's claim: SCMoE beats greedy on reasoning.

``moepp``: two byte-level MoE LMs with the same 8 FFN experts (dim 64, 4 layers, width 64, top-2),
one of them MoE++ (plus 1 zero, 1 copy and 2 constant experts, gating residual, tau 0.75), trained
on the same stdlib bytes. Reported: held-out loss, FFN experts per token, and the expert-forward
time: one ``MoELayer`` (at the trained width and at moe-small's) replays each trained model's
recorded routing of held-out batches through ``override_routing``, so both layers do exactly the
work their learned routers ask for.

``moetuner``: a byte-level top-2 MoE (dim 64, 4 layers, 8 experts) is trained, its routing traced
on held-out windows, and ``plan_placement`` (ILP, greedy, round-robin) run for 2 and 4 devices under
both traffic models; the same for the untrained model (random routers) as a control.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from moekit.layers import MoEConfig, MoELayer
from moekit.models import ModelConfig, MoEForCausalLM

BASE = dict(vocab_size=256, dim=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=128)


def _moe_model(seed: int, **moe_kw) -> MoEForCausalLM:
    torch.manual_seed(seed)
    moe = MoEConfig(dim=64, ffn_dim=64, num_experts=8, top_k=2, **moe_kw)
    return MoEForCausalLM(ModelConfig(**BASE, moe=moe, aux_loss_coef=0.01))


# SCMoE on synthetic addition


def _line(a: int, b: int, digits: int) -> str:
    return f"{a:0{digits}d}+{b:0{digits}d}={a + b:0{digits + 1}d}\n"


def _addition_data(steps: int, batch: int, digits: int, seed: int):
    """``steps`` batches ``[batch, lines * (3 * digits + 4)]`` of whole lines, and 300 held-out pairs
    that no training line contains."""
    gen = np.random.default_rng(seed)
    top = 10**digits
    held = set()
    while len(held) < 300:
        held.add((int(gen.integers(top)), int(gen.integers(top))))
    lines = 60 // (3 * digits + 4)
    batches = []
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            row = ""
            while len(row) < lines * (3 * digits + 4):
                a, b = int(gen.integers(top)), int(gen.integers(top))
                if (a, b) not in held:
                    row += _line(a, b, digits)
            rows.append(list(row.encode()))
        batches.append(torch.tensor(rows, dtype=torch.long))
    return batches, sorted(held)


def _complete(model, prompts: torch.Tensor, new: int, beta: float | None, weak: str) -> list[str]:
    from moekit.infer.decoding import SelfContrastSession
    from moekit.models.decode import DecodeSession
    from moekit.models.generation import iter_tokens

    if beta is None:
        source = DecodeSession(model, prompts, max_new_tokens=new)
    else:
        source = SelfContrastSession(model, prompts, max_new_tokens=new, alpha=0.1, beta=beta, weak=weak)
    out = torch.stack(list(iter_tokens(source, new)), dim=1)
    return [bytes(row.tolist()).decode("latin-1") for row in out]


def scmoe(steps: int, seed: int, digits: int = 2) -> None:
    """Prints the SCMoE table (markdown)."""
    from paper_rows import _train

    t0 = time.perf_counter()
    train, held = _addition_data(steps, 32, digits, seed)
    model = _moe_model(seed)
    _train(model, train, steps)
    prompt_len = 2 * digits + 2
    prompts = torch.tensor(
        [list(_line(a, b, digits)[:prompt_len].encode()) for a, b in held], dtype=torch.long
    )
    answers = [_line(a, b, digits)[prompt_len:-1] for a, b in held]
    train_s = time.perf_counter() - t0
    rows = [("greedy", None, "-")]
    for weak in ("rank:3", "top:1"):
        rows += [(f"SCMoE beta {beta}", beta, weak) for beta in (0.1, 0.5, 1.0)]
    print(
        f"seed {seed}: {steps} steps x 32 rows of whole {digits}-digit lines; {len(held)} held-out pairs; "
        f"training {train_s:.0f} s"
    )
    print("| decoding | weak routing | exact match | answer bytes correct |")
    print("|---|---|---|---|")
    for name, beta, weak in rows:
        got = _complete(model, prompts, digits + 1, beta, weak)
        exact = sum(g == a for g, a in zip(got, answers)) / len(answers)
        chars = sum(x == y for g, a in zip(got, answers) for x, y in zip(g, a)) / (
            (digits + 1) * len(answers)
        )
        print(f"| {name} | {weak} | {exact:.3f} | {chars:.3f} |")


# MoE++ against vanilla MoE


class _FixedRouting:
    """A routing override that replays recorded expert ids and weights (same tokens, any width)."""

    def __init__(self, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> None:
        self.ids_TK, self.weights_TK = ids_TK, weights_TK

    def __call__(self, router, x_TD, token_mask_T, prev_logits_TE, k):
        from dataclasses import replace

        out = router(x_TD, token_mask_T, prev_logits_TE, k)
        return replace(out, expert_ids_TK=self.ids_TK, choice_ids_TK=self.ids_TK, weights_TK=self.weights_TK)


def _expert_forward_seconds(
    moe_kw: dict[str, dict], routes: dict[str, list], dim: int, ffn_dim: int, repeats: int = 7
) -> dict[str, float]:
    """Per model name: median over ``repeats`` of the summed forward time of one ``MoELayer`` (width
    ``dim``, experts of width ``ffn_dim``) replaying each recorded ``(ids, weights)`` routing on random
    inputs. The models take turns within each repeat, so load from other processes hits both alike."""
    layers, inputs = {}, {}
    for name, kw in moe_kw.items():
        torch.manual_seed(0)
        layers[name] = MoELayer(MoEConfig(dim=dim, ffn_dim=ffn_dim, num_experts=8, top_k=2, **kw)).eval()
        inputs[name] = [torch.randn(ids.shape[0], dim) for ids, _ in routes[name]]
    totals: dict[str, list[float]] = {name: [] for name in moe_kw}
    with torch.no_grad():
        for rep in range(repeats + 1):
            for name, layer in layers.items():
                t0 = time.perf_counter()
                for x, (ids, w) in zip(inputs[name], routes[name]):
                    with layer.override_routing(_FixedRouting(ids, w)):
                        layer(x)
                if rep:  # the first pass warms up
                    totals[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in totals.items()}


def moepp(steps: int, seed: int) -> None:
    """Prints the MoE++ table (markdown)."""
    from paper_rows import BATCH, SEQ, _data, _train

    from moekit.data import eval_batches

    train, val = _data(steps, seed)
    moe_kw = {
        "vanilla MoE (8 FFN experts, top-2)": {},
        "MoE++ (8 FFN + 1 zero + 1 copy + 2 constant, top-2)": dict(
            num_zero_experts=1,
            num_copy_experts=1,
            num_constant_experts=2,
            gating_residual=True,
            zero_expert_tau=0.75,
        ),
    }
    models = {name: _moe_model(seed, **kw) for name, kw in moe_kw.items()}
    from paper_rows import _stream

    from moekit.data import resolve_corpus, split_documents

    _, val_docs = split_documents(resolve_corpus(None, max_bytes=1_500_000), 0.05)
    timing = eval_batches(_stream(val_docs), 256, 16, 2)
    print(
        f"seed {seed}: {steps} steps x {BATCH} x {SEQ} bytes. Expert-forward time: one MoE layer replaying the "
        "trained model's routing of 2 x 16 x 256 held-out bytes (4 layers each), at the trained width "
        "(D 64, F 64) and at moe-small's (D 256, F 512), median of 7"
    )
    print(
        "| model | parameters | held-out loss | FFN experts per token | slots on zero-computation experts "
        "| expert forward, D 64 / F 64 (s) | expert forward, D 256 / F 512 (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    routes: dict[str, list] = {}
    rows = {}
    for name, model in models.items():
        _train(model, train, steps)
        total = count = 0.0
        ffn_slots = zc_slots = 0
        with torch.no_grad():
            for b in val:
                out = model(b[:, :-1])
                total += float(
                    torch.nn.functional.cross_entropy(
                        out.logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum"
                    )
                )
                count += b[:, 1:].numel()
                for r in out.routing:
                    ids = r.expert_ids
                    ffn_slots += int(((ids >= 0) & (ids < 8)).sum())
                    zc_slots += int((ids >= 8).sum())
        num_layers = len(out.routing)
        per_token = ffn_slots / (count * num_layers)
        zc_share = zc_slots / max(ffn_slots + zc_slots, 1)
        routes[name] = []
        with torch.no_grad():
            for b in timing:
                routes[name] += [(r.expert_ids, r.weights) for r in model(b[:, :-1]).routing]
        rows[name] = (sum(p.numel() for p in model.parameters()), total / count, per_token, zc_share)
    times = {dim: _expert_forward_seconds(moe_kw, routes, dim, ffn) for dim, ffn in ((64, 64), (256, 512))}
    first = next(iter(moe_kw))
    for name, (params, loss, per_token, zc_share) in rows.items():
        cells = [f"{times[d][name]:.3f} ({times[d][first] / times[d][name]:.2f}x)" for d in (64, 256)]
        print(
            f"| {name} | {params / 1e3:.0f}k | {loss:.4f} | {per_token:.3f} | {zc_share:.3f} | "
            + " | ".join(cells)
            + " |"
        )


# MoETuner placement against round-robin


def moetuner(steps: int, seed: int) -> None:
    """Prints the MoETuner tables (markdown)."""
    from paper_rows import _data, _train

    from moekit.analysis import record_trace
    from moekit.parallel.placement import plan_placement

    train, val = _data(steps, seed)
    windows = torch.cat(val)[:, :-1]
    for label, trained in (("trained", True), ("untrained (random routers, control)", False)):
        model = _moe_model(seed)
        if trained:
            _train(model, train, steps)
        model.eval()
        with torch.no_grad():
            trace = record_trace(model, [(w, None) for w in windows.split(16)], label)
        print(
            f"\n{label}: trace of {trace.num_tokens} held-out tokens, {trace.num_layers} MoE layers x 8 experts"
        )
        print(
            "| devices | traffic | load slack | round-robin imbalance (mean / worst) | greedy imbalance, "
            "moves vs RR | ILP imbalance, moves vs RR |"
        )
        print("|---|---|---|---|---|---|")
        for traffic in ("stay", "home"):
            for devices in (2, 4):
                for slack in (0.1, 0.3):
                    res = plan_placement(trace, devices, load_slack=slack, time_limit_s=20.0, traffic=traffic)
                    rr = res.reports["round_robin"]

                    def cell(name: str, rr=rr, res=res) -> str:
                        if name not in res.reports:
                            return "infeasible at this slack"
                        rep = res.reports[name]
                        return (
                            f"{rep.imbalance:.3f} / {rep.max_imbalance:.3f}, "
                            f"{rep.token_moves / max(rr.token_moves, 1):.3f}"
                        )

                    print(
                        f"| {devices} | {traffic} | {slack} | {rr.imbalance:.3f} / {rr.max_imbalance:.3f} "
                        f"({rr.token_moves:.0f} moves) | {cell('greedy')} | {cell('ilp')} |"
                    )
