"""docs/papers.md row for AquilaMoE (``python benchmarks/paper_rows.py aki``): scale-up schemes.

A small dense byte-level LM (dim 64, 2 layers, 4 query / 2 key-value heads of width 16, SwiGLU FFN
width 128) is trained here on the Python stdlib source, then grown to FFN width 256, 8 query / 4
key-value heads and 4 layers by each scheme of ``moekit.surgery.grow``:

* ``FPI, zero-out depth``: FPI width and heads, stacked layers whose output projections are zero
  (the whole model is function preserving: its step-0 loss must equal the small model's);
* ``FPI`` (bert2BERT): FPI width and heads, depth by stacking plain copies;
* ``AKI`` (bert2BERT): AKI width and heads (new units from layer l+1), depth by stacking copies;
* ``AKI-Pro`` (AquilaMoE): AKI width and heads, depth by interpolation (L1, L1', L2, L2').

Each grown model, the small model itself and the large shape from random weights are then trained
for the same steps on the same new batches (``moekit.train.fit``). Reported: held-out loss at step 0
and after the continued training. The paper's claim: AKI-Pro < AKI < FPI after continued training.
"""

from __future__ import annotations

import copy
import time

import torch

from moekit.models import ModelConfig, MoEForCausalLM
from moekit.surgery import GrowConfig, grow

SMALL = dict(
    vocab_size=256,
    dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    moe=None,
    moe_placement="none",
    aux_loss_coef=0.0,
)
GROWN = dict(ffn_dim=256, num_heads=8, num_new_layers=2)


def _eval(model: MoEForCausalLM, val: list) -> float:
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


def schemes(seed: int) -> dict[str, GrowConfig]:
    """The grown variants compared (each a :class:`GrowConfig`)."""
    return {
        "FPI, zero-out depth (exact)": GrowConfig(
            **GROWN,
            ffn_scheme="fpi",
            attn_scheme="fpi",
            depth_position="stack",
            depth_init="zero_out",
            seed=seed,
        ),
        "FPI (bert2BERT: stack copies)": GrowConfig(
            **GROWN, ffn_scheme="fpi", attn_scheme="fpi", depth_position="stack", depth_init="copy", seed=seed
        ),
        "AKI (bert2BERT: stack copies)": GrowConfig.aki(**GROWN, seed=seed),
        "AKI-Pro (AquilaMoE: interpolate)": GrowConfig.aki_pro(**GROWN, seed=seed),
    }


def aki(pre_steps: int, steps: int, seed: int) -> None:
    """Prints the AquilaMoE table (markdown)."""
    from paper_rows import BATCH, SEQ, _data, _train

    data, val = _data(pre_steps + steps, seed)
    pre, cont = data[:pre_steps], data[pre_steps:]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    small = MoEForCausalLM(ModelConfig(**SMALL))
    _train(small, pre, pre_steps)
    rows = {}
    candidates = {"small model, continued": copy.deepcopy(small)}
    for name, cfg in schemes(seed).items():
        candidates[name] = grow(small, cfg)
    big_cfg = candidates["AKI-Pro (AquilaMoE: interpolate)"].config
    torch.manual_seed(seed)
    candidates["large shape, random init"] = MoEForCausalLM(big_cfg)
    for name, model in candidates.items():
        start = _eval(model, val)
        model.train()
        _train(model, cont, steps)
        rows[name] = (start, _eval(model, val), sum(p.numel() for p in model.parameters()))
    print(
        f"seed {seed}: small dense trained {pre_steps} steps, then every model {steps} steps on the same "
        f"new batches ({BATCH} x {SEQ} bytes); {len(val)} x {BATCH} held-out windows; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print("| model | parameters | held-out loss at step 0 | after continued training |")
    print("|---|---|---|---|")
    for name, (start, end, params) in rows.items():
        print(f"| {name} | {params / 1e3:.0f}k | {start:.4f} | {end:.4f} |")
