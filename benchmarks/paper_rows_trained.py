"""docs/papers.md rows measured on MoE models trained here (run through ``benchmarks/paper_rows.py``):

    python benchmarks/paper_rows.py scmoe     # SCMoE vs greedy, exact match on synthetic addition
    python benchmarks/paper_rows.py moepp     # MoE++ vs vanilla MoE: loss and MoE-layer throughput
    python benchmarks/paper_rows.py moetuner  # MoETuner ILP placement vs round-robin on a trace

``scmoe``: a byte-level top-2 MoE (dim 64, 4 layers, 8 experts of width 64) is trained on lines
``"aa+bb=ccc\\n"`` (operands 0-99 zero-padded to 2 digits, the sum to 3), with 300 of the 10,000
pairs held out. Each held-out prompt ``"aa+bb="`` is completed with 3 bytes by greedy decoding and
by SCMoE (``SelfContrastSession``, alpha 0.1, weak ``rank:3`` and ``top:1``) at several betas;
score = exact match of the 3 answer bytes. The paper's claim: SCMoE beats greedy on reasoning.

``moepp``: two byte-level MoE LMs with the same 8 FFN experts (dim 64, 4 layers, width 64, top-2),
one of them MoE++ (plus 1 zero, 1 copy and 2 constant experts, gating residual, tau 0.75), trained
on the same stdlib bytes. Reported: held-out loss, FFN experts per token, and the wall time of the
MoE layers' forwards (hooks around each ``MoELayer``) on held-out batches of 16 x 256 bytes.

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

LINE = 10  # "aa+bb=ccc\n"
PROMPT = 6  # "aa+bb="


def _line(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}={a + b:03d}\n"


def _addition_data(steps: int, batch: int, lines: int, seed: int):
    gen = np.random.default_rng(seed)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    order = gen.permutation(len(pairs))
    held = [pairs[i] for i in order[:300]]
    train_pairs = [pairs[i] for i in order[300:]]
    batches = []
    for _ in range(steps):
        idx = gen.integers(0, len(train_pairs), size=(batch, lines))
        rows = ["".join(_line(*train_pairs[i]) for i in row) for row in idx]
        batches.append(torch.tensor([list(r.encode()) for r in rows], dtype=torch.long))
    return batches, held


def _complete(model, prompts: torch.Tensor, beta: float | None, weak: str) -> list[str]:
    from moekit.infer.decoding import SelfContrastSession
    from moekit.models.decode import DecodeSession
    from moekit.models.generation import iter_tokens

    if beta is None:
        source = DecodeSession(model, prompts, max_new_tokens=3)
    else:
        source = SelfContrastSession(model, prompts, max_new_tokens=3, alpha=0.1, beta=beta, weak=weak)
    out = torch.stack(list(iter_tokens(source, 3)), dim=1)
    return [bytes(row.tolist()).decode("latin-1") for row in out]


def scmoe(steps: int, seed: int) -> None:
    """Prints the SCMoE table (markdown)."""
    from paper_rows import _train

    t0 = time.perf_counter()
    train, held = _addition_data(steps, 32, 6, seed)
    model = _moe_model(seed)
    _train(model, train, steps)
    prompts = torch.tensor([list(_line(a, b)[:PROMPT].encode()) for a, b in held], dtype=torch.long)
    answers = [_line(a, b)[PROMPT : PROMPT + 3] for a, b in held]
    train_s = time.perf_counter() - t0
    rows = [("greedy", None, "-")]
    for weak in ("rank:3", "top:1"):
        rows += [(f"SCMoE beta {beta}", beta, weak) for beta in (0.1, 0.5, 1.0)]
    print(
        f"seed {seed}: {steps} steps x 32 rows x 6 lines of 'aa+bb=ccc'; {len(held)} held-out pairs; "
        f"training {train_s:.0f} s"
    )
    print("| decoding | weak routing | exact match | answer bytes correct |")
    print("|---|---|---|---|")
    for name, beta, weak in rows:
        got = _complete(model, prompts, beta, weak)
        exact = sum(g == a for g, a in zip(got, answers)) / len(answers)
        chars = sum(x == y for g, a in zip(got, answers) for x, y in zip(g, a)) / (3 * len(answers))
        print(f"| {name} | {weak} | {exact:.3f} | {chars:.3f} |")


# MoE++ against vanilla MoE


def _moe_layer_seconds(model: MoEForCausalLM, batches: list, repeats: int = 5) -> float:
    """Median over ``repeats`` of the summed wall time of every MoE layer's forward on ``batches``."""
    spent = [0.0]
    starts: dict[int, float] = {}

    def pre(mod, args):
        starts[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        spent[0] += time.perf_counter() - starts[id(mod)]

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    handles = [h for m in layers for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    totals = []
    try:
        with torch.no_grad():
            model(batches[0][:, :-1])  # warm-up
            for _ in range(repeats):
                spent[0] = 0.0
                for b in batches:
                    model(b[:, :-1])
                totals.append(spent[0])
    finally:
        for h in handles:
            h.remove()
    return statistics.median(totals)


def moepp(steps: int, seed: int) -> None:
    """Prints the MoE++ table (markdown)."""
    from paper_rows import BATCH, SEQ, _data, _train

    from moekit.data import eval_batches

    train, val = _data(steps, seed)
    models = {
        "vanilla MoE (8 FFN experts, top-2)": _moe_model(seed),
        "MoE++ (8 FFN + 1 zero + 1 copy + 2 constant, top-2)": _moe_model(
            seed,
            num_zero_experts=1,
            num_copy_experts=1,
            num_constant_experts=2,
            gating_residual=True,
            zero_expert_tau=0.75,
        ),
    }
    from paper_rows import _stream

    from moekit.data import resolve_corpus, split_documents

    _, val_docs = split_documents(resolve_corpus(None, max_bytes=1_500_000), 0.05)
    timing = eval_batches(_stream(val_docs), 256, 16, 2)
    print(
        f"seed {seed}: {steps} steps x {BATCH} x {SEQ} bytes; timing on 2 batches of 16 x 256 held-out bytes"
    )
    print(
        "| model | parameters | held-out loss | FFN experts per token | MoE-layer forward (s) | share of tokens' slots on zero-computation experts |"
    )
    print("|---|---|---|---|---|---|")
    base_s = None
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
        sec = _moe_layer_seconds(model, timing)
        base_s = base_s or sec
        params = sum(p.numel() for p in model.parameters())
        print(
            f"| {name} | {params / 1e3:.0f}k | {total / count:.4f} | {per_token:.3f} | {sec:.3f} "
            f"({base_s / sec:.2f}x) | {zc_share:.3f} |"
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
