"""Centroids for token-cluster gating (``router_type="centroid"``): k-means and fitting them to a model.

Shape legend: N = token states, D = model width, K = clusters (= the router's experts E).

Moirai-MoE's recipe: run a pretrained *dense* model over training data, collect the token
states that enter each FFN, cluster them per layer with k-means (k = number of experts), and
route each token of the MoE model to its nearest centroids. :func:`kmeans` is the clustering
(k-means++ seeding, Lloyd iterations, seeded, no global RNG); :func:`fit_centroids` is the
surgery-style step: it returns a copy of an MoE model whose centroid routers hold the centroids
of the states a source model (the dense twin, or the model itself) feeds its FFNs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.moe import MoELayer


def _sq_dist(x_ND: Tensor, c_KD: Tensor) -> Tensor:
    return torch.cdist(x_ND, c_KD, compute_mode="donot_use_mm_for_euclid_dist").square()


def kmeans_plus_plus(x_ND: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: ``[K, D]`` rows of ``x_ND``, each next one drawn with probability
    proportional to its squared distance to the nearest centroid chosen so far."""
    num_n = x_ND.shape[0]
    first = int(torch.randint(num_n, (1,), generator=generator))
    chosen = [first]
    d2_N = _sq_dist(x_ND, x_ND[first : first + 1]).squeeze(1)
    for _ in range(1, num_clusters):
        total = float(d2_N.sum())
        if total <= 0:  # every point coincides with a centroid: any unused point will do
            probs_N = torch.ones(num_n, dtype=torch.float64)
            probs_N[chosen] = 0
        else:
            probs_N = (d2_N / total).double().cpu()
        nxt = int(torch.multinomial(probs_N, 1, generator=generator))
        chosen.append(nxt)
        d2_N = torch.minimum(d2_N, _sq_dist(x_ND, x_ND[nxt : nxt + 1]).squeeze(1))
    return x_ND[chosen].clone()


def kmeans(x_ND: Tensor, num_clusters: int, num_iters: int = 50, seed: int = 0) -> Tensor:
    """Clusters N points into ``num_clusters``: the centroids ``[K, D]`` (in at least float32).

    k-means++ seeding from ``torch.Generator(seed)``, then Lloyd iterations until the assignment
    stops changing or ``num_iters`` run. A cluster that empties is re-seeded with the point
    farthest from its centroid, so every centroid stays in use. Deterministic for a given seed.

    Raises:
        ValueError: fewer points than clusters, or a non-2-D input.
    """
    if x_ND.ndim != 2:
        raise ValueError(f"kmeans: points must be [N, D], got shape {tuple(x_ND.shape)}")
    if num_clusters < 1 or x_ND.shape[0] < num_clusters:
        raise ValueError(
            f"kmeans: {x_ND.shape[0]} points cannot make {num_clusters} clusters; collect more tokens"
        )
    x_ND = x_ND.detach().to(torch.promote_types(x_ND.dtype, torch.float32))
    generator = torch.Generator().manual_seed(int(seed))
    c_KD = kmeans_plus_plus(x_ND, num_clusters, generator)
    assign_N = None
    for _ in range(max(num_iters, 0)):
        d2_NK = _sq_dist(x_ND, c_KD)
        new_assign_N = d2_NK.argmin(dim=1)
        if assign_N is not None and torch.equal(new_assign_N, assign_N):
            break
        assign_N = new_assign_N
        counts_K = torch.bincount(assign_N, minlength=num_clusters)
        sums_KD = torch.zeros_like(c_KD).index_add_(0, assign_N, x_ND)
        c_KD = torch.where(counts_K[:, None] > 0, sums_KD / counts_K.clamp_min(1)[:, None], c_KD)
        empty = torch.nonzero(counts_K == 0).flatten().tolist()
        if empty:
            own_N = d2_NK.gather(1, assign_N[:, None]).squeeze(1)
            far = own_N.argsort(descending=True)[: len(empty)]
            c_KD[empty] = x_ND[far]
    return c_KD


def centroid_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The MoE layers of ``model`` that route by centroids, by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, MoELayer) and m.config.router_type == "centroid"
    }


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


@torch.no_grad()
def fit_centroids(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    source: nn.Module | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    num_iters: int = 50,
    seed: int = 0,
    max_tokens: int = 65536,
) -> nn.Module:
    """A copy of ``model`` whose centroid routers hold k-means centroids of ``source``'s FFN inputs.

    For every centroid-routed MoE layer of ``model`` (named ``NAME``), the module ``NAME`` of
    ``source`` (default: ``model`` itself; usually its pretrained dense twin, whose FFN sits at
    the same name) is hooked; ``forward(source, batch)`` (default ``source(**batch)`` or
    ``source(batch)``) runs over ``batches`` in eval mode; the states entering that module
    (``[..., D]``, padding dropped when the call passes a ``token_mask``) are subsampled to
    ``max_tokens`` and clustered into the layer's ``E`` centroids. Neither input is changed.

    Raises:
        ValueError: ``model`` has no centroid router, ``source`` has no module of that name or a
            different width, or too few tokens were seen.
    """
    target = copy.deepcopy(model)
    layers = centroid_layers(target)
    if not layers:
        raise ValueError("fit_centroids: the model has no MoE layer with router_type='centroid'")
    src = model if source is None else source
    run = forward or _default_forward
    found: dict[str, list[Tensor]] = {name: [] for name in layers}
    modules = dict(src.named_modules())
    hooks = []
    for name, layer in layers.items():
        if name not in modules:
            raise ValueError(
                f"fit_centroids: the source model has no module {name!r}; pass a dense twin whose FFNs "
                "sit at the MoE model's layer names"
            )

        def hook(module, args, kwargs, name=name, dim=layer.config.dim):
            x = args[0]
            if x.shape[-1] != dim:
                raise ValueError(f"fit_centroids: {name} of the source has width {x.shape[-1]}, not {dim}")
            mask = kwargs.get("token_mask", args[1] if len(args) > 1 else None)
            x_ND = x.reshape(-1, dim)
            if mask is not None:
                x_ND = x_ND[mask.reshape(-1).to(torch.bool)]
            found[name].append(x_ND.detach().to(torch.float64).cpu())

        hooks.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    was_training = src.training
    src.eval()
    try:
        for batch in batches:
            run(src, batch)
    finally:
        for h in hooks:
            h.remove()
        src.train(was_training)
    generator = torch.Generator().manual_seed(int(seed))
    for i, (name, layer) in enumerate(layers.items()):
        x_ND = torch.cat(found[name]) if found[name] else torch.zeros(0, layer.config.dim)
        if x_ND.shape[0] > max_tokens:
            x_ND = x_ND[torch.randperm(x_ND.shape[0], generator=generator)[:max_tokens]]
        c_KD = kmeans(x_ND, layer.config.num_total_experts, num_iters, seed + i)
        centroids = layer.router.centroids
        centroids.copy_(c_KD.to(device=centroids.device, dtype=centroids.dtype))
    return target


__all__ = ["centroid_layers", "fit_centroids", "kmeans", "kmeans_plus_plus"]
