"""Scale-up of a dense model before scale-out (AquilaMoE EfficientScale, with Net2Net / bert2BERT
style function-preserving growth): wider FFNs, a wider residual stream, more layers.

Shape legend: V = vocabulary, D -> D2 model width, F -> F2 FFN width, H = FFN input rows (2F for
SwiGLU: gate rows then up rows), Q = attention inner width (heads x head_dim, unchanged), L -> L2 layers.

Which schemes preserve the function (``tests/test_surgery.py`` checks each exact one):

=====================  ==========================================================  =====================
scheme                 what the new weights are                                     exact?
=====================  ==========================================================  =====================
ffn ``zero``           new hidden units: random input rows, zero output columns     yes (float64 ~1e-15)
ffn ``fpi``            new unit j copies a random old unit g(j); the output          yes (rounding only)
                       columns of g and its copies are divided by the replica count
width ``zero``         new residual coordinates stay 0: zero new embedding columns   up to float32
                       and zero rows of every projection writing the stream (o_proj, rounding: moekit's
                       FFN w_out); random new columns of every projection reading   RMSNorm runs in
                       it (q/k/v, or MLA's q/q_a/kv_a, FFN w_in). RMSNorm averages over D2, so its weights are multiplied  float32
                       by sqrt(D/D2) and ``rms_norm_eps`` by D/D2; q/k RMSNorm shares
                       that eps, so q_proj/k_proj are scaled by sqrt(D/D2) to cancel
                       it (q/k norms are scale-invariant apart from eps)
depth ``zero_out``     inserted layer = copy of its source with o_proj and FFN      yes (bit-exact)
                       w_out zeroed: it adds exactly 0 to the stream
depth ``copy``         inserted layer = plain copy (AKI-Pro "interpolation" order)  no
=====================  ==========================================================  =====================

Not implemented: AKI width growth (new units copied from layer l+1: not function-preserving by
design), FPI for the residual width (breaks under RMSNorm), and growing the number of attention
heads (AKI-Pro's GQA expansion); the attention inner width Q stays fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import JsonConfig, check_choice
from moekit.models import MoEForCausalLM
from moekit.surgery.common import build_model, clone_state, model_dtype

FFN_SCHEMES = ("zero", "fpi")
WIDTH_SCHEMES = ("zero",)
DEPTH_POSITIONS = ("interleave", "stack")
DEPTH_INITS = ("zero_out", "copy")


@dataclass(kw_only=True)
class GrowConfig(JsonConfig):
    """How to grow a dense model.

    Attributes:
        ffn_dim: new FFN width F2 >= F, or None to keep it.
        ffn_scheme: ``"zero"`` or ``"fpi"`` (see the module table).
        dim: new model width D2 >= D, or None to keep it.
        width_scheme: ``"zero"``.
        num_new_layers: layers to add (0 keeps the depth).
        depth_position: ``"interleave"`` (each of ``num_new_layers`` evenly spaced layers is followed
            by its copy, AKI-Pro's L1, L1', L2, L2' order) or ``"stack"`` (copies of layers
            0..n-1 appended on top, bert2BERT/AKI stacking).
        depth_init: ``"zero_out"`` (exact) or ``"copy"`` (not exact).
        init_std: std of the random new input weights.
        seed: seeds the random weights and FPI's unit mapping.
    """

    ffn_dim: int | None = None
    ffn_scheme: str = "zero"
    dim: int | None = None
    width_scheme: str = "zero"
    num_new_layers: int = 0
    depth_position: str = "interleave"
    depth_init: str = "zero_out"
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        name = "GrowConfig"
        check_choice(name, "ffn_scheme", self.ffn_scheme, FFN_SCHEMES)
        check_choice(name, "width_scheme", self.width_scheme, WIDTH_SCHEMES)
        check_choice(name, "depth_position", self.depth_position, DEPTH_POSITIONS)
        check_choice(name, "depth_init", self.depth_init, DEPTH_INITS)
        for f in ("ffn_dim", "dim"):
            if getattr(self, f) is not None and getattr(self, f) <= 0:
                raise ValueError(f"{name}.{f} must be positive (or None to keep it), got {getattr(self, f)}")
        if self.num_new_layers < 0:
            raise ValueError(f"{name}.num_new_layers must be >= 0, got {self.num_new_layers}")
        if self.init_std < 0:
            raise ValueError(f"{name}.init_std must be >= 0, got {self.init_std}")


@torch.no_grad()
def grow(model: MoEForCausalLM, config: GrowConfig) -> MoEForCausalLM:
    """Grows a dense model: residual width, then FFN width, then depth.

    Args:
        model: a dense moekit model (no MoE layers); not modified.
        config: :class:`GrowConfig`.

    Returns:
        A new dense :class:`MoEForCausalLM` in the source dtype (eval mode).
    """
    cfg = model.config
    if cfg.num_moe_layers:
        raise ValueError(
            f"grow: the model has MoE layers {cfg.moe_layer_ids}; grow the dense model, then upcycle"
        )
    gen = torch.Generator().manual_seed(config.seed)
    state = {k: v.to(torch.float64) for k, v in clone_state(model).items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    new_cfg = cfg.replace(head_dim=cfg.attn_head_dim)
    if config.dim is not None and config.dim != cfg.dim:
        if config.dim < cfg.dim:
            raise ValueError(f"GrowConfig.dim={config.dim} is smaller than the model width {cfg.dim}")
        state = _grow_width(state, cfg, config.dim, config, gen)
        new_cfg = new_cfg.replace(dim=config.dim, rms_norm_eps=cfg.rms_norm_eps * cfg.dim / config.dim)
    if config.ffn_dim is not None and config.ffn_dim != cfg.ffn_dim:
        if config.ffn_dim < cfg.ffn_dim:
            raise ValueError(
                f"GrowConfig.ffn_dim={config.ffn_dim} is smaller than the FFN width {cfg.ffn_dim}"
            )
        for i in range(cfg.num_layers):
            p = f"layers.{i}.mlp."
            state[p + "w_in.weight"], state[p + "w_out.weight"] = _grow_ffn(
                state[p + "w_in.weight"],
                state[p + "w_out.weight"],
                config.ffn_dim,
                cfg.dense_ffn_activation,
                config,
                gen,
            )
        new_cfg = new_cfg.replace(ffn_dim=config.ffn_dim)
    if config.num_new_layers:
        state, order = _grow_depth(state, cfg.num_layers, config)
        new_cfg = new_cfg.replace(num_layers=len(order))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return build_model(new_cfg, state, model_dtype(model))


# Projections that read the residual stream (MHA q/k/v, MLA q / q_a / kv_a, FFN input, shared
# expert input); their new input columns are random. Writers get zero rows.
_STREAM_READERS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.q_a_proj.weight",
    "self_attn.kv_a_proj.weight",
    "mlp.w_in.weight",
)


def _grow_width(
    state: dict[str, Tensor], cfg, dim2: int, config: GrowConfig, gen: torch.Generator
) -> dict[str, Tensor]:
    dim = cfg.dim
    extra = dim2 - dim
    norm_scale = math.sqrt(dim / dim2)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * config.init_std

    out = {}
    for name, w in state.items():
        if name == "embed_tokens.weight":
            out[name] = torch.cat([w, w.new_zeros(w.shape[0], extra)], 1)  # writes the stream: zero
        elif name.endswith("norm.weight") and "self_attn." not in name:  # input/post-attention/final norms
            out[name] = torch.cat([w, w.new_ones(extra)]) * norm_scale
        elif name.endswith(_STREAM_READERS) or (name == "lm_head.weight"):
            new_cols = rand(w.shape[0], extra)
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                new_cols.zero_()  # tied to the embedding, which must write zeros
            w2 = torch.cat([w, new_cols], 1)
            if cfg.qk_norm != "none" and name.endswith(("q_proj.weight", "k_proj.weight")):
                w2 = w2 * norm_scale  # cancels the eps change inside the q/k RMSNorm
            out[name] = w2
        elif name.endswith(("q_proj.bias", "k_proj.bias")) and cfg.qk_norm != "none":
            out[name] = w * norm_scale
        elif name.endswith(("o_proj.weight", "mlp.w_out.weight")):
            out[name] = torch.cat([w, w.new_zeros(extra, w.shape[1])], 0)  # writes the stream: zero
        else:
            out[name] = w
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def _grow_ffn(
    w_in_HD: Tensor, w_out_DF: Tensor, ffn2: int, activation: str, config: GrowConfig, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``(w_in [H, D], w_out [D, F]) -> (w_in [H2, D], w_out [D, F2])`` by the chosen scheme."""
    ffn = w_out_DF.shape[1]
    extra = ffn2 - ffn
    parts = list(w_in_HD.split(ffn)) if activation == "swiglu" else [w_in_HD]  # gate, up
    if config.ffn_scheme == "zero":
        new_parts = [
            torch.cat([p, torch.randn(extra, p.shape[1], generator=gen, dtype=p.dtype) * config.init_std])
            for p in parts
        ]
        w_out = torch.cat([w_out_DF, w_out_DF.new_zeros(w_out_DF.shape[0], extra)], 1)
        return torch.cat(new_parts), w_out
    # FPI: unit j >= F copies unit g(j); every replica of unit u gets w_out[:, u] / count(u).
    g = torch.cat([torch.arange(ffn), torch.randint(ffn, (extra,), generator=gen)])
    counts = torch.bincount(g, minlength=ffn).to(w_out_DF.dtype)
    new_parts = [p[g] for p in parts]
    w_out = w_out_DF[:, g] / counts[g]
    return torch.cat(new_parts), w_out


def depth_order(num_layers: int, config: GrowConfig) -> list[tuple[int, bool]]:
    """The grown layer list as ``(source layer, is_new)`` pairs."""
    n = config.num_new_layers
    if config.depth_position == "stack":
        if n > num_layers:
            raise ValueError(
                f"GrowConfig.num_new_layers={n} > {num_layers} layers: 'stack' copies each at most once"
            )
        return [(i, False) for i in range(num_layers)] + [(i, True) for i in range(n)]
    if n > num_layers:
        raise ValueError(
            f"GrowConfig.num_new_layers={n} > {num_layers}: 'interleave' duplicates each layer once"
        )
    chosen = {round(j * num_layers / n) for j in range(n)} if n else set()
    order = []
    for i in range(num_layers):
        order.append((i, False))
        if i in chosen:
            order.append((i, True))
    return order


def _grow_depth(state: dict[str, Tensor], num_layers: int, config: GrowConfig):
    order = depth_order(num_layers, config)
    out = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for new_i, (src, is_new) in enumerate(order):
        prefix = f"layers.{src}."
        for k, v in state.items():
            if k.startswith(prefix):
                rest = k[len(prefix) :]
                w = v.clone()
                if (
                    is_new
                    and config.depth_init == "zero_out"
                    and rest
                    in (
                        "self_attn.o_proj.weight",
                        "mlp.w_out.weight",
                        "mlp.w_out.bias",
                    )
                ):
                    w.zero_()
                out[f"layers.{new_i}.{rest}"] = w
    return out, order
