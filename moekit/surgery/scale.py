"""Scale-up of a dense model before scale-out (AquilaMoE EfficientScale: Net2Net / bert2BERT
function-preserving growth, bert2BERT's AKI and AquilaMoE's AKI-Pro): wider FFNs, more attention
heads (whole GQA groups), a wider residual stream, more layers.

Shape legend: V = vocabulary, D -> D2 model width, F -> F2 FFN width, H = FFN input rows (2F for
SwiGLU: gate rows then up rows), Nq -> Nq2 query heads, Nkv -> Nkv2 key/value heads (GQA groups),
R = Nq / Nkv query heads per group (kept), Dh = head width (kept), L -> L2 layers.

Which schemes preserve the function (``tests/test_surgery.py`` checks each exact one):

=====================  ==========================================================  =====================
scheme                 what the new weights are                                     exact?
=====================  ==========================================================  =====================
ffn ``zero``           new hidden units: random input rows, zero output columns     yes (float64 ~1e-15)
ffn ``fpi``            new unit j copies a random old unit g(j); the output          yes (rounding only)
                       columns of g and its copies are divided by the replica count
ffn ``aki``            bert2BERT AKI: as fpi, but the new unit's input rows come     no (by design)
                       from unit g(j) of layer l+1 (the top layer uses its own)
heads ``fpi``          a new GQA group copies a random old group (its R query heads  yes (rounding only)
                       and its k/v head); o_proj columns divided by the group count
heads ``aki``          as heads fpi, but the new group's q/k/v rows come from layer  no (by design)
                       l+1 (the top layer uses its own)
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

AKI (bert2BERT section 4.1): expand the in-dimension of W^l and W^{l+1} as FPI does (U = EXPAND_in),
then fill the new out-dimension units of layer l from U^{l+1}; here the out-dimension units are FFN
hidden units and GQA groups, and the in-dimension (o_proj / w_out columns) is FPI-expanded from
layer l. AKI-Pro (AquilaMoE) is AKI width growth with depth growth by interpolation (L1, L1', L2,
L2', ``depth_position="interleave"``, ``depth_init="copy"``) and GQA-aware head growth; see
:meth:`GrowConfig.aki_pro`. Per-head q/k RMSNorm weights are shared by all heads of a layer, so an
AKI head keeps layer l's q/k norm. Head growth does not support MLA or ``qk_norm="full"``.

Not implemented: AKI / FPI for the residual width D (FPI breaks under RMSNorm; only ``zero``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import JsonConfig, check_choice
from moekit.models import MoEForCausalLM
from moekit.surgery.common import build_model, clone_state, model_dtype

FFN_SCHEMES = ("zero", "fpi", "aki")
ATTN_SCHEMES = ("fpi", "aki")
WIDTH_SCHEMES = ("zero",)
DEPTH_POSITIONS = ("interleave", "stack")
DEPTH_INITS = ("zero_out", "copy")


@dataclass(kw_only=True)
class GrowConfig(JsonConfig):
    """How to grow a dense model.

    Attributes:
        ffn_dim: new FFN width F2 >= F, or None to keep it.
        ffn_scheme: ``"zero"``, ``"fpi"`` or ``"aki"`` (see the module table).
        num_heads: new query-head count Nq2 >= Nq, or None to keep it. It must add whole GQA groups
            (a multiple of Nq / Nkv heads); the key/value heads grow by one per added group.
        attn_scheme: head growth scheme, ``"fpi"`` (exact) or ``"aki"``.
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
    num_heads: int | None = None
    attn_scheme: str = "fpi"
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
        check_choice(name, "attn_scheme", self.attn_scheme, ATTN_SCHEMES)
        check_choice(name, "width_scheme", self.width_scheme, WIDTH_SCHEMES)
        check_choice(name, "depth_position", self.depth_position, DEPTH_POSITIONS)
        check_choice(name, "depth_init", self.depth_init, DEPTH_INITS)
        for f in ("ffn_dim", "dim", "num_heads"):
            if getattr(self, f) is not None and getattr(self, f) <= 0:
                raise ValueError(f"{name}.{f} must be positive (or None to keep it), got {getattr(self, f)}")
        if self.num_new_layers < 0:
            raise ValueError(f"{name}.num_new_layers must be >= 0, got {self.num_new_layers}")
        if self.init_std < 0:
            raise ValueError(f"{name}.init_std must be >= 0, got {self.init_std}")

    @classmethod
    def aki_pro(
        cls,
        *,
        ffn_dim: int | None = None,
        num_heads: int | None = None,
        num_new_layers: int = 0,
        seed: int = 0,
    ) -> GrowConfig:
        """AquilaMoE's AKI-Pro: AKI FFN and head growth, depth by interpolation (plain copies)."""
        return cls(
            ffn_dim=ffn_dim,
            ffn_scheme="aki",
            num_heads=num_heads,
            attn_scheme="aki",
            num_new_layers=num_new_layers,
            depth_position="interleave",
            depth_init="copy",
            seed=seed,
        )

    @classmethod
    def aki(
        cls,
        *,
        ffn_dim: int | None = None,
        num_heads: int | None = None,
        num_new_layers: int = 0,
        seed: int = 0,
    ) -> GrowConfig:
        """bert2BERT's AKI: AKI FFN and head growth, depth by stacking (copies of the lowest layers)."""
        return cls(
            ffn_dim=ffn_dim,
            ffn_scheme="aki",
            num_heads=num_heads,
            attn_scheme="aki",
            num_new_layers=num_new_layers,
            depth_position="stack",
            depth_init="copy",
            seed=seed,
        )


@torch.no_grad()
def grow(model: MoEForCausalLM, config: GrowConfig) -> MoEForCausalLM:
    """Grows a dense model: residual width, then attention heads, then FFN width, then depth.

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
    if config.num_heads is not None and config.num_heads != cfg.num_heads:
        num_kv2 = _check_head_growth(cfg, config.num_heads)
        grown_heads = {}
        for i in range(cfg.num_layers):
            grown = grow_heads(
                _attn_weights(state, i),
                _attn_weights(state, _next_layer(state, i, "self_attn.q_proj.weight", config.attn_scheme)),
                cfg.attn_head_dim,
                cfg.num_heads // cfg.attn_num_kv_heads,
                head_group_map(cfg.attn_num_kv_heads, num_kv2, gen),
            )
            grown_heads.update({f"layers.{i}.self_attn.{k}": v for k, v in grown.items()})
        state.update(grown_heads)  # after the loop: AKI reads layer l+1's original heads
        new_cfg = new_cfg.replace(
            num_heads=config.num_heads, num_kv_heads=None if cfg.num_kv_heads is None else num_kv2
        )
    if config.ffn_dim is not None and config.ffn_dim != cfg.ffn_dim:
        if config.ffn_dim < cfg.ffn_dim:
            raise ValueError(
                f"GrowConfig.ffn_dim={config.ffn_dim} is smaller than the FFN width {cfg.ffn_dim}"
            )
        grown_ffn = {}
        for i in range(cfg.num_layers):
            p = f"layers.{i}.mlp."
            nxt = f"layers.{_next_layer(state, i, 'mlp.w_in.weight', config.ffn_scheme)}.mlp.w_in.weight"
            grown_ffn[p + "w_in.weight"], grown_ffn[p + "w_out.weight"] = _grow_ffn(
                state[p + "w_in.weight"],
                state[p + "w_out.weight"],
                state[nxt],
                config.ffn_dim,
                cfg.dense_ffn_activation,
                config,
                gen,
            )
        state.update(grown_ffn)  # after the loop: AKI reads layer l+1's *original* rows
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


def _next_layer(state: dict[str, Tensor], i: int, key: str, scheme: str) -> int:
    """The layer AKI takes new units from: i + 1 when it has ``key`` of the same shape, else i
    (the top layer, or a neighbour of another kind, uses its own weights, which is FPI)."""
    here, there = state.get(f"layers.{i}.{key}"), state.get(f"layers.{i + 1}.{key}")
    if scheme == "aki" and there is not None and here is not None and there.shape == here.shape:
        return i + 1
    return i


def ffn_unit_map(ffn: int, ffn2: int, gen: torch.Generator) -> Tensor:
    """FPI's mapping g ``[F2]``: g(j) = j for the F old units, a uniform random old unit for the rest."""
    return torch.cat([torch.arange(ffn), torch.randint(ffn, (ffn2 - ffn,), generator=gen)])


def grow_ffn_units(
    w_in_HD: Tensor, w_out_DF: Tensor, w_in_next_HD: Tensor, g_J: Tensor, activation: str
) -> tuple[Tensor, Tensor]:
    """FPI / AKI growth of one FFN's hidden units by the mapping ``g_J`` ``[F2]`` (see :func:`ffn_unit_map`).

    Old unit j < F keeps its input rows; new unit j >= F takes input rows g(j) of ``w_in_next_HD``
    (layer l+1 for AKI; pass ``w_in_HD`` itself for FPI). Every unit j gets output column
    ``w_out[:, g(j)] / count(g(j))``, count = how many units map to g(j) (bert2BERT's EXPAND_in).

    Args:
        w_in_HD: ``[H, D]`` input projection of layer l (gate rows then up rows for SwiGLU).
        w_out_DF: ``[D, F]`` output projection of layer l.
        w_in_next_HD: ``[H, D]`` where the new units' input rows come from.
        g_J: ``[F2]`` int64 mapping with ``g_J[:F] == arange(F)``.
        activation: ``"swiglu"`` (two row blocks) or another activation (one block).

    Returns:
        ``(w_in [H2, D], w_out [D, F2])``.
    """
    ffn = w_out_DF.shape[1]
    num_parts = 2 if activation == "swiglu" else 1
    parts, next_parts = w_in_HD.split(ffn), w_in_next_HD.split(ffn)
    new_g = g_J[ffn:]
    new_parts = [torch.cat([p, q[new_g]]) for p, q in zip(parts[:num_parts], next_parts[:num_parts])]
    counts = torch.bincount(g_J, minlength=ffn).to(w_out_DF.dtype)
    return torch.cat(new_parts), w_out_DF[:, g_J] / counts[g_J]


def _grow_ffn(
    w_in_HD: Tensor,
    w_out_DF: Tensor,
    w_in_next_HD: Tensor,
    ffn2: int,
    activation: str,
    config: GrowConfig,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``(w_in [H, D], w_out [D, F]) -> (w_in [H2, D], w_out [D, F2])`` by the chosen scheme."""
    ffn = w_out_DF.shape[1]
    extra = ffn2 - ffn
    if config.ffn_scheme == "zero":
        parts = list(w_in_HD.split(ffn)) if activation == "swiglu" else [w_in_HD]  # gate, up
        new_parts = [
            torch.cat([p, torch.randn(extra, p.shape[1], generator=gen, dtype=p.dtype) * config.init_std])
            for p in parts
        ]
        w_out = torch.cat([w_out_DF, w_out_DF.new_zeros(w_out_DF.shape[0], extra)], 1)
        return torch.cat(new_parts), w_out
    # FPI copies from layer l itself, AKI from layer l+1 (w_in_next_HD is layer l's own for FPI).
    g = ffn_unit_map(ffn, ffn2, gen)
    return grow_ffn_units(w_in_HD, w_out_DF, w_in_next_HD, g, activation)


_ATTN_KEYS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")


def _attn_weights(state: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    p = f"layers.{i}.self_attn."
    return {k: state[p + k] for k in (*_ATTN_KEYS, "o_proj.weight") if p + k in state}


def _check_head_growth(cfg, num_heads2: int) -> int:
    """Validates head growth for ``cfg``; returns the new key/value head count."""
    if cfg.attention_type != "mha":
        raise ValueError(
            f"GrowConfig.num_heads: head growth needs attention_type='mha', got {cfg.attention_type!r}"
        )
    if cfg.qk_norm == "full":
        raise ValueError(
            "GrowConfig.num_heads: head growth does not support qk_norm='full' (the norm spans all heads)"
        )
    if any(t != "attention" for t in (cfg.layer_types or ())):
        raise ValueError("GrowConfig.num_heads: head growth needs every layer to be an attention layer")
    group = cfg.num_heads // cfg.attn_num_kv_heads
    if num_heads2 < cfg.num_heads or (num_heads2 - cfg.num_heads) % group:
        raise ValueError(
            f"GrowConfig.num_heads={num_heads2} must add whole GQA groups of {group} query heads to "
            f"{cfg.num_heads} (num_kv_heads={cfg.attn_num_kv_heads})"
        )
    return num_heads2 // group


def head_group_map(num_groups: int, num_groups2: int, gen: torch.Generator) -> Tensor:
    """The GQA group mapping ``[Nkv2]``: old groups map to themselves, new ones to a random old group."""
    return ffn_unit_map(num_groups, num_groups2, gen)


def grow_heads(
    attn: dict[str, Tensor], attn_next: dict[str, Tensor], head_dim: int, group_size: int, h_G: Tensor
) -> dict[str, Tensor]:
    """FPI / AKI growth of one attention layer by whole GQA groups.

    New group j >= Nkv (its R query heads and its k/v head, appended after the old ones so query head
    n still reads k/v head n // R) copies the q/k/v rows (and biases) of group h(j) from ``attn_next``
    (layer l+1 for AKI, layer l itself for FPI). Every query head of group j gets o_proj columns of
    the same head of group h(j) of layer l, divided by count(h(j)). With FPI the copies compute the
    same attention output as their source, so the layer's output is unchanged.

    Args:
        attn: layer l's tensors: ``q_proj.weight [Nq*Dh, D]``, ``k_proj.weight``/``v_proj.weight``
            ``[Nkv*Dh, D]``, optional ``*_proj.bias``, ``o_proj.weight [D, Nq*Dh]``.
        attn_next: the same keys of the layer new groups copy from (o_proj is not read).
        head_dim: Dh.
        group_size: R query heads per group.
        h_G: ``[Nkv2]`` int64 group mapping with ``h_G[:Nkv] == arange(Nkv)``.

    Returns:
        The grown tensors under the same keys.
    """
    num_groups = attn["k_proj.weight"].shape[0] // head_dim
    new_h = h_G[num_groups:]
    # Row index blocks: query rows of group u are [u*R*Dh, (u+1)*R*Dh), k/v rows [u*Dh, (u+1)*Dh).
    offs_q = torch.arange(group_size * head_dim)
    offs_kv = torch.arange(head_dim)
    q_rows = (new_h[:, None] * group_size * head_dim + offs_q).flatten()
    kv_rows = (new_h[:, None] * head_dim + offs_kv).flatten()
    out = {}
    for key, w in attn.items():
        if key == "o_proj.weight":
            continue
        rows = q_rows if key.startswith("q_proj") else kv_rows
        out[key] = torch.cat([w, attn_next[key][rows]])
    counts = torch.bincount(h_G, minlength=num_groups).to(attn["o_proj.weight"].dtype)
    all_cols = (h_G[:, None] * group_size * head_dim + offs_q).flatten()
    col_count = counts[h_G].repeat_interleave(group_size * head_dim)
    out["o_proj.weight"] = attn["o_proj.weight"][:, all_cols] / col_count
    return out


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
