"""Helpers shared by the surgery operations: rebuilding a model from a config and a state dict,
reading FFN weights, collecting FFN inputs on calibration data, a small torch k-means, expert
usage, parameter snapshots, and short freeze-aware fine-tuning through the training engine.

Shape legend: N = tokens, D = model width, F = FFN hidden width, H = input-projection rows (2F for
SwiGLU: gate rows then up rows; F for GELU), E = experts, B = batch, S = sequence length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from moekit.layers import FeedForward, MoELayer
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.models.objectives import token_cross_entropy

Batches = Sequence[Tensor]


def as_batches(data: Tensor | Iterable[Tensor] | None) -> list[Tensor]:
    """Normalises calibration data to a list of ``[B, S]`` int64 token batches (a ``[B, S]`` tensor
    is one batch, a ``[S]`` tensor one sequence)."""
    if data is None:
        return []
    if isinstance(data, Tensor):
        data = [data if data.ndim == 2 else data.unsqueeze(0)]
    return [b if b.ndim == 2 else b.unsqueeze(0) for b in data]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def build_model(config: ModelConfig, state: dict[str, Tensor], dtype: torch.dtype) -> MoEForCausalLM:
    """A new :class:`MoEForCausalLM` with ``config``, cast to ``dtype``, loaded strictly from ``state``.

    Raises ``ValueError`` naming the tensor when ``state`` misses, adds or mis-shapes one.
    """
    model = MoEForCausalLM(config).to(dtype)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        expected.pop("lm_head.weight", None)
    for name, tensor in expected.items():
        if name not in state:
            raise ValueError(f"surgery: tensor {name!r} missing from the rebuilt state")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"surgery: tensor {name!r} has shape {tuple(state[name].shape)}, the new config expects "
                f"{tuple(tensor.shape)}"
            )
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(f"surgery: unexpected tensor(s) {unknown[:5]} for the new config")
    model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
    model.train(False)
    return model


def clone_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached, cloned copy of ``model.state_dict()`` (persistent entries only)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def dense_ffn(model: MoEForCausalLM, layer: int) -> FeedForward:
    """The dense FFN of decoder layer ``layer``; ``ValueError`` when that layer is MoE."""
    mlp = model.layers[layer].mlp
    if not isinstance(mlp, FeedForward):
        raise ValueError(f"layer {layer} is an MoE layer; this operation needs a dense FFN there")
    return mlp


def moe_layer(model: MoEForCausalLM, layer: int) -> MoELayer:
    """The MoE FFN of decoder layer ``layer``; ``ValueError`` when that layer is dense."""
    mlp = model.layers[layer].mlp
    if not isinstance(mlp, MoELayer):
        raise ValueError(f"layer {layer} is dense; this operation needs an MoE layer there")
    return mlp


def require_plain_experts(model: MoEForCausalLM, what: str) -> None:
    """Raises ``ValueError`` when an MoE layer has MoE++ zero-computation experts (router rows of
    those sit after the FFN experts; the operations here renumber FFN experts only)."""
    for i in model.config.moe_layer_ids:
        cfg = model.config.moe_config(i)
        extra = cfg.num_zero_experts + cfg.num_copy_experts + cfg.num_constant_experts
        if extra:
            raise ValueError(
                f"{what}: layer {i} has {extra} MoE++ zero-computation experts (num_zero_experts/"
                "num_copy_experts/num_constant_experts); this operation supports FFN experts only"
            )


@torch.no_grad()
def collect_ffn_inputs(
    model: MoEForCausalLM, batches: Batches, layers: Sequence[int], max_tokens: int | None = None
) -> dict[int, Tensor]:
    """The inputs each listed layer's FFN sees (the post-attention norm's output in pre-norm models).

    Args:
        model: dense or MoE model (run in eval mode).
        batches: ``[B, S]`` token batches.
        layers: decoder layer indices.
        max_tokens: keep at most this many tokens per layer (the first ones).

    Returns:
        ``{layer: x_ND}`` in the model's dtype, N = tokens over all batches.
    """
    store: dict[int, list[Tensor]] = {i: [] for i in layers}
    hooks = []
    for i in layers:

        def hook(_mod, args, i=i):
            x = args[0]
            store[i].append(x.detach().reshape(-1, x.shape[-1]))

        # A pre-hook on the FFN itself: right for post-norm layers too, whose FFN reads the stream.
        hooks.append(model.layers[i].mlp.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in as_batches(batches):
            model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for i, parts in store.items():
        if not parts:
            raise ValueError("collect_ffn_inputs: no calibration batches were given")
        x_ND = torch.cat(parts)
        out[i] = x_ND[:max_tokens] if max_tokens else x_ND
    return out


def kmeans(
    x_ND: Tensor, num_clusters: int, num_iters: int = 25, seed: int = 0, spherical: bool = True
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding, in float64.

    Spherical (the default) normalises points and centroids to unit length and assigns by cosine,
    which matches how a linear router scores normalised hidden states. An empty cluster is
    re-seeded with the point farthest from its centroid.

    Args:
        x_ND: points ``[N, D]``; needs ``N >= num_clusters``.
        num_clusters: C.

    Returns:
        ``(centroids_CD, assign_N)``: float64 centroids (unit length when spherical) and int64
        cluster ids.
    """
    num_n = x_ND.shape[0]
    if num_n < num_clusters:
        raise ValueError(
            f"kmeans: {num_n} points cannot form {num_clusters} clusters; give more calibration data"
        )
    x = x_ND.detach().to(torch.float64)
    if spherical:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)

    def dist(points_ND: Tensor, cents_CD: Tensor) -> Tensor:
        if spherical:
            return 1.0 - points_ND @ cents_CD.t()
        return torch.cdist(points_ND, cents_CD).square()

    first = int(torch.randint(num_n, (1,), generator=gen))
    cents = [x[first]]
    for _ in range(1, num_clusters):
        d_N = dist(x, torch.stack(cents)).amin(-1).clamp_min(0)
        probs = d_N / d_N.sum() if float(d_N.sum()) > 0 else torch.full_like(d_N, 1.0 / num_n)
        cents.append(x[int(torch.multinomial(probs, 1, generator=gen))])
    cents_CD = torch.stack(cents)
    assign_N = dist(x, cents_CD).argmin(-1)
    for _ in range(num_iters):
        new_CD = torch.zeros_like(cents_CD).index_add_(0, assign_N, x)
        counts_C = torch.bincount(assign_N, minlength=num_clusters)
        for c in torch.nonzero(counts_C == 0).flatten().tolist():
            far = int(dist(x, cents_CD).gather(1, assign_N[:, None]).squeeze(1).argmax())
            new_CD[c], counts_C[c] = x[far], 1
            assign_N[far] = c
        new_CD = new_CD / counts_C.unsqueeze(-1).to(x.dtype)
        if spherical:
            new_CD = new_CD / new_CD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        new_assign = dist(x, new_CD).argmin(-1)
        cents_CD = new_CD
        if torch.equal(new_assign, assign_N):
            break
        assign_N = new_assign
    return cents_CD, assign_N


def router_rows_from_directions(dirs_ED: Tensor, x_ND: Tensor | None, logit_std: float) -> Tensor:
    """Router rows pointing along ``dirs_ED`` (normalised), scaled so the logits on ``x_ND`` have
    standard deviation ``logit_std`` (unit-norm rows when ``x_ND`` is None): ``[E, D]`` float64."""
    rows = dirs_ED.to(torch.float64)
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if x_ND is not None and x_ND.numel():
        std = float((x_ND.to(torch.float64) @ rows.t()).std())
        if std > 0:
            rows = rows * (logit_std / std)
    return rows


@torch.no_grad()
def expert_usage(model: MoEForCausalLM, batches: Batches, metric: str = "tokens") -> list[Tensor]:
    """Per MoE layer, how much each expert is used on ``batches``.

    Args:
        metric: ``"tokens"`` (assignments after capacity) or ``"gate_mass"`` (sum of the combine
            weights the expert received).

    Returns:
        One float64 ``[E]`` tensor per MoE layer, in layer order.
    """
    was_training = model.training
    model.eval()
    totals: list[Tensor] = []
    try:
        for batch in as_batches(batches):
            out = model(batch)
            for j, info in enumerate(out.routing):
                num_e = info.router_logits.shape[-1]
                ids = info.expert_ids.reshape(-1)
                valid = ids >= 0
                if metric == "tokens":
                    vals = torch.ones_like(ids, dtype=torch.float64)
                else:
                    vals = info.weights.reshape(-1).to(torch.float64)
                use = torch.zeros(num_e, dtype=torch.float64).index_add_(0, ids[valid], vals[valid])
                if j < len(totals):
                    totals[j] += use
                else:
                    totals.append(use)
    finally:
        model.train(was_training)
    if not totals:
        raise ValueError("expert_usage: no calibration batches were given (or the model has no MoE layer)")
    return totals


def snapshot(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Cloned parameters and buffers (all, or those in ``names``), for :func:`changed_tensors`."""
    state = dict(model.state_dict(keep_vars=False))
    keep = set(state) if names is None else set(names)
    return {k: v.detach().clone() for k, v in state.items() if k in keep}


def changed_tensors(model: nn.Module, before: dict[str, Tensor]) -> list[str]:
    """Names in ``before`` whose tensor in ``model`` is no longer bit-identical (``torch.equal``)."""
    now = model.state_dict()
    return sorted(k for k, v in before.items() if k not in now or not torch.equal(now[k], v))


def train_steps(
    model: MoEForCausalLM,
    batches: Batches,
    steps: int,
    lr: float = 1e-3,
    freeze: Sequence[str] = (),
    weight_decay: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """A short fine-tuning run through the training engine (:func:`moekit.train.fit`, nothing written
    to disk): ``steps`` AdamW steps over ``batches`` cycled in order, loss = LM + aux weighted by
    the model's recommended coefficients, warmup over the first tenth, cosine to ``lr / 10``,
    gradient clipping at 1.

    Trains ``model`` in place (callers pass a copy) and returns the per-step losses. Each batch is
    ``[B, S + 1]``: inputs ``[:, :-1]``, targets ``[:, 1:]``. Every parameter is made trainable
    first (except frozen-by-design routers), then ``freeze`` decides what stays fixed, so earlier
    freezing does not leak between stages. No expert-bias update runs here.
    """
    from moekit.data import BatchListDataModule
    from moekit.models.objectives import CausalLMObjective, LossWeights
    from moekit.train import LoopConfig, fit

    batches = as_batches(batches)
    if not batches:
        raise ValueError("train_steps: no batches were given")
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(True)
    for m in model.modules():  # the shared base of LoRA experts is frozen by design too
        if hasattr(m, "freeze_base"):
            m.freeze_base()
    for mlp in model.moe_layers:  # frozen-by-design routers (SMoE-Dropout) stay frozen
        if mlp.config.router_frozen or mlp.config.router_type == "random_fixed":
            mlp.router.weight.requires_grad_(False)
            if mlp.router.bias is not None:  # SMoE-Dropout's random router has a bias, frozen too
                mlp.router.bias.requires_grad_(False)
    loop = LoopConfig(
        max_steps=steps,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=max(1, steps // 10),
        weight_decay=weight_decay,
        grad_clip=1.0,
        freeze=list(freeze),
        expert_bias_update=False,
        deterministic=False,
    )
    objective = CausalLMObjective(LossWeights.from_model_config(model.config))
    result = fit(
        model, objective, BatchListDataModule(batches), loop, None, progress=False, dist_context=None
    )
    model.eval()
    return [loss for _, loss in result.losses]


@torch.no_grad()
def lm_loss(model: MoEForCausalLM, batches: Batches) -> float:
    """Mean next-token cross-entropy (nats/token) over ``[B, S + 1]`` batches, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in as_batches(batches):
            logits = model(batch[:, :-1]).logits
            total += float(token_cross_entropy(logits, batch[:, 1:], reduction="sum"))
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)
