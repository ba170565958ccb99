"""Upcycling for the vision family: copy upcycling of ViT/CLIP FFNs, and CLIP-MoE's diversified
multiplet upcycling (DMU, Zhang et al. 2024) as the paper does it.

Shape legend: N = image-text pairs, J = projection width, E = experts = stages, C = clusters.

Copy upcycling (:func:`upcycle_vision`): each chosen dense FFN (biased, GELU or quick-GELU) becomes E
biased experts copied from it and a new router. With softmax routing and renormalised top-k
weights (the defaults) the output equals the dense parent's whatever the router (tested).

Diversified multiplet upcycling (:func:`multiplet_upcycle`, ``recipe="multiplet"``):

1. stage 0 is the dense base; it is expert 0. Encode every pair with it, cluster image and text
   embeddings separately (``clusters_per_modality`` each, spherical k-means); the pair's pseudo-label
   is ``text_cluster * k + image_cluster``;
2. stage s = 1 .. E-1 fine-tunes a copy of the base on **all** pairs with the contrastive loss,
   every batch drawn from one pseudo-label cluster (clusters in turn, so in-batch negatives share
   every earlier clustering), only the FFNs of the layers to upcycle trainable; then re-encode with
   the stage model, re-cluster, and refine the labels (``label * k^2 + new``: up to ``k^(2s)`` clusters);
3. the experts of layer l are the FFNs of layer l of the E stage models; attention, embeddings and
   norms come from stage 0; each router is new (random);
4. only the routers train, with the contrastive loss + ``aux_loss_coef`` x the load-balance loss.

``recipe="per_cluster_only"`` is the cheaper variant :mod:`moekit.surgery.dmu` uses for the LM: one
clustering into E clusters of the base's joint embeddings, expert c fine-tuned on cluster c's pairs
only, the base itself not an expert. Differences from the paper: no DDP sampler, one short caption
per image (no long/short caption losses), a fixed step budget per stage instead of epochs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.config import JsonConfig, check_choice
from moekit.layers import MoEConfig
from moekit.models.vision import CLIPMoE, ViTMoE
from moekit.models.vision.config import EncoderConfig
from moekit.surgery.common import kmeans
from moekit.surgery.upcycle import UpcycleConfig, expert_weights_from_ffn

RECIPES = ("multiplet", "per_cluster_only")
TOWERS = ("vision", "text")


def _towers(model: nn.Module, towers: tuple[str, ...]) -> dict[str, tuple[str, EncoderConfig]]:
    """tower name -> (state-dict prefix of its encoder, its config)."""
    if isinstance(model, ViTMoE):
        return {"vision": ("encoder", model.config)}
    if not isinstance(model, CLIPMoE):
        raise ValueError(f"upcycle_vision takes a ViTMoE or CLIPMoE, got {type(model).__name__}")
    bad = sorted(set(towers) - set(TOWERS))
    if bad:
        raise ValueError(f"towers {bad} are not CLIP towers; choose from {list(TOWERS)}")
    cfgs = {"vision": model.config.vision, "text": model.config.text}
    return {t: (f"{t}.encoder", cfgs[t]) for t in towers}


def _layer_ids(cfg: EncoderConfig, up: UpcycleConfig) -> list[int]:
    if up.layers == "all":
        return list(range(cfg.num_layers))
    if up.layers == "every_other":
        return [i for i in range(cfg.num_layers) if i % 2 == 1]
    bad = [i for i in up.layer_indices or () if not 0 <= i < cfg.num_layers]
    if bad:
        raise ValueError(f"UpcycleConfig.layer_indices {bad} out of range [0, {cfg.num_layers})")
    return sorted(set(up.layer_indices or ()))


def upcycled_layers(
    model: nn.Module, config: UpcycleConfig, towers: tuple[str, ...] = TOWERS
) -> dict[str, list[int]]:
    """Encoder state-dict prefix -> the layers :func:`upcycle_vision` turns into MoE."""
    return {prefix: _layer_ids(cfg, config) for prefix, cfg in _towers(model, towers).values()}


@torch.no_grad()
def upcycle_vision(dense: nn.Module, config: UpcycleConfig, towers: tuple[str, ...] = TOWERS) -> nn.Module:
    """Sparse upcycling of a dense :class:`ViTMoE` or :class:`CLIPMoE` (``towers`` for CLIP).

    ``expert_init`` ``"copy"`` or ``"noise"``; ``router_init`` ``"zeros"`` or ``"random"``. Returns a new
    model of the same class in eval mode; ``dense`` is not modified.
    """
    if config.expert_init == "split" or config.router_init == "kmeans":
        raise ValueError("upcycle_vision supports expert_init copy/noise and router_init zeros/random")
    parts = _towers(dense, towers)
    changes: dict[str, EncoderConfig] = {}
    layers: dict[str, list[int]] = {}
    for tower, (prefix, cfg) in parts.items():
        if cfg.moe_layer_ids:
            raise ValueError(f"upcycle_vision: the {tower} tower already has MoE layers {cfg.moe_layer_ids}")
        ids = _layer_ids(cfg, config)
        if not ids:
            raise ValueError(f"upcycle_vision: no layer of the {tower} tower is chosen")
        moe = MoEConfig(
            dim=cfg.dim,
            ffn_dim=cfg.ffn_dim,
            num_experts=config.num_experts,
            top_k=config.top_k,
            activation=cfg.activation,
            ffn_bias=True,
            **config.moe_overrides,
        )
        every = ids == list(range(cfg.num_layers))
        changes[tower] = cfg.replace(
            moe=moe,
            moe_placement="all" if every else "explicit",
            moe_layer_indices=None if every else tuple(ids),
        )
        layers[prefix] = ids
    if isinstance(dense, ViTMoE):
        new_cfg = changes["vision"].replace(aux_loss_coef=config.aux_loss_coef)
    else:
        new_cfg = dense.config.replace(**changes, aux_loss_coef=config.aux_loss_coef)
    gen = torch.Generator().manual_seed(config.seed)
    state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    for prefix, ids in layers.items():
        for i in ids:
            p = f"{prefix}.layers.{i}.mlp."
            w_in, b_in = state.pop(p + "w_in.weight"), state.pop(p + "w_in.bias")
            w_out, b_out = state.pop(p + "w_out.weight"), state.pop(p + "w_out.bias")
            act = "gelu"  # expert_weights_from_ffn only distinguishes swiglu's gate/up halves
            ins, outs = expert_weights_from_ffn(w_in, w_out, config, act, gen)
            state[p + "experts.w_in"], state[p + "experts.w_out"] = ins.clone(), outs.clone()
            state[p + "experts.b_in"] = b_in.unsqueeze(0).repeat(config.num_experts, 1)
            state[p + "experts.b_out"] = b_out.unsqueeze(0).repeat(config.num_experts, 1)
            weight = torch.zeros(config.num_experts, w_in.shape[1], dtype=w_in.dtype)
            if config.router_init == "random":
                weight = (
                    torch.randn(weight.shape, generator=gen, dtype=torch.float64) * config.router_std
                ).to(w_in.dtype)
            state[p + "router.weight"] = weight
            if config.moe_overrides.get("router_bias"):
                state[p + "router.bias"] = torch.zeros(config.num_experts, dtype=w_in.dtype)
    dtype = next(dense.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
        model = type(dense)(new_cfg).to(dtype)
    model.load_state_dict(state)
    return model.eval()


@dataclass(kw_only=True)
class MultipletConfig(JsonConfig):
    """Diversified multiplet upcycling of a CLIP (module doc).

    Attributes:
        upcycle: placement, E (= stages, base included) and k; experts are copies before stage
            weights replace them; the router init ``"random"``.
        towers: which towers get MoE layers.
        recipe: ``"multiplet"`` (the paper) or ``"per_cluster_only"`` (expert c on cluster c only).
        clusters_per_modality: k of each modality's k-means (paper: 3).
        stage_steps, stage_lr: fine-tuning of each stage (FFNs of the upcycled layers only).
        router_steps, router_lr: router-only training after assembly (0 skips it).
        batch_size: pairs per batch.
        aux_loss_coef: load-balance weight in router training (paper: 0.01).
        seed: seeds clustering, batches and training.
    """

    upcycle: UpcycleConfig = field(default_factory=lambda: UpcycleConfig(num_experts=4, top_k=2))
    towers: tuple[str, ...] = TOWERS
    recipe: str = "multiplet"
    clusters_per_modality: int = 3
    stage_steps: int = 30
    stage_lr: float = 1e-3
    router_steps: int = 30
    router_lr: float = 1e-2
    batch_size: int = 32
    aux_loss_coef: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        name = "MultipletConfig"
        if isinstance(self.upcycle, dict):
            self.upcycle = UpcycleConfig.from_dict(self.upcycle)
        self.towers = tuple(self.towers)
        check_choice(name, "recipe", self.recipe, RECIPES)
        for f in ("clusters_per_modality", "batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("stage_steps", "router_steps"):
            if getattr(self, f) < 0:
                raise ValueError(f"{name}.{f} must be >= 0, got {getattr(self, f)}")
        if self.stage_lr <= 0 or self.router_lr <= 0 or self.aux_loss_coef < 0:
            raise ValueError(f"{name}: learning rates must be positive and aux_loss_coef >= 0")
        if self.upcycle.num_experts < 2:
            raise ValueError(f"{name}.upcycle.num_experts must be >= 2 (the base plus a stage)")


@dataclass
class MultipletResult:
    """What :func:`multiplet_upcycle` returns.

    Attributes:
        model: the CLIP-MoE (eval mode).
        labels: the pseudo-labels ``[N]`` each stage's batches were drawn by (stage 1 first).
        trainable: stage name -> the parameter names that stage trained.
        stage_losses: per fine-tuning stage, the per-step losses.
    """

    model: CLIPMoE
    labels: list[Tensor] = field(default_factory=list)
    trainable: dict[str, list[str]] = field(default_factory=dict)
    stage_losses: list[list[float]] = field(default_factory=list)


@torch.no_grad()
def embed_pairs(model: CLIPMoE, data: dict[str, Tensor], chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Normalised ``(image [N, J], text [N, J])`` embeddings of every pair, in eval mode."""
    was = model.training
    model.eval()
    imgs, txts = [], []
    try:
        for i in range(0, len(data["input_ids"]), chunk):
            out = model(
                input_ids=data["input_ids"][i : i + chunk],
                pixel_values=data["pixel_values"][i : i + chunk],
                attention_mask=data["attention_mask"][i : i + chunk],
            )
            imgs.append(out.image_embeds)
            txts.append(out.text_embeds)
    finally:
        model.train(was)
    return torch.cat(imgs), torch.cat(txts)


def pair_clusters(model: CLIPMoE, data: dict[str, Tensor], k: int, seed: int) -> Tensor:
    """``text_cluster * k + image_cluster`` per pair ``[N]`` (each modality's spherical k-means)."""
    img, txt = embed_pairs(model, data)
    _, a_img = kmeans(img, k, seed=seed)
    _, a_txt = kmeans(txt, k, seed=seed + 1)
    return a_txt * k + a_img


def cluster_batches(labels_N: Tensor, batch_size: int, seed: int) -> list[Tensor]:
    """Index batches covering every item whose cluster has >= 2 members, each batch from one
    cluster, clusters taken in turn (CLIP-MoE's MCL sampler). A batch of one pair has no negative,
    so singleton clusters and singleton remainders are left out."""
    gen = torch.Generator().manual_seed(seed)
    per_cluster = []
    for c in torch.unique(labels_N).tolist():
        idx = torch.nonzero(labels_N == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        chunks = [b for b in idx.split(batch_size) if len(b) >= 2]
        if chunks:
            per_cluster.append(chunks)
    out = []
    for r in range(max((len(c) for c in per_cluster), default=0)):
        out += [chunks[r] for chunks in per_cluster if r < len(chunks)]
    if not out:
        raise ValueError("cluster_batches: no cluster has two items; give more data or fewer clusters")
    return out


def _mlp_only_spec(layers: dict[str, list[int]]) -> str:
    alts = "|".join(
        f"{p.replace('.', chr(92) + '.')}\\.layers\\.({'|'.join(map(str, ids))})\\.mlp\\."
        for p, ids in layers.items()
    )
    return f"re:^(?!({alts}))"


def fine_tune_pairs(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    steps: int,
    lr: float,
    freeze: list[str],
    aux: float,
    seed: int,
) -> tuple[list[float], list[str]]:
    """A short contrastive fine-tuning of a CLIP through :func:`moekit.train.fit` (nothing written):
    ``steps`` AdamW steps over ``batches`` cycled in order, ``freeze`` specs applied after making
    everything trainable, loss = contrastive + ``aux`` x load balance. Returns the per-step losses
    and the names that were trainable."""
    from moekit.data import BatchListDataModule
    from moekit.models.objectives import LossWeights
    from moekit.models.vision import ContrastiveObjective
    from moekit.train import LoopConfig, fit

    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(True)
    loop = LoopConfig(
        max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10), freeze=freeze,
        expert_bias_update=False, deterministic=False, eval_interval=max(steps, 1),
    )  # fmt: skip
    objective = ContrastiveObjective(LossWeights(load_balance=aux))
    result = fit(
        model, objective, BatchListDataModule(batches), loop, None, progress=False, dist_context=None
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    model.eval()
    return [loss for _, loss in result.losses], trainable


def _take(data: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    return {k: data[k][idx] for k in ("pixel_values", "input_ids", "attention_mask")}


def multiplet_upcycle(dense: CLIPMoE, config: MultipletConfig, data: dict[str, Tensor]) -> MultipletResult:
    """Diversified multiplet upcycling of a dense CLIP (module doc); ``dense`` is not modified.

    Args:
        dense: a dense :class:`CLIPMoE`.
        config: :class:`MultipletConfig`.
        data: every training pair: ``pixel_values [N, C, H, W]``, ``input_ids [N, S]``,
            ``attention_mask [N, S]``.
    """
    num_e, k = config.upcycle.num_experts, config.clusters_per_modality
    up = config.upcycle.replace(expert_init="copy", router_init="random")
    layers = upcycled_layers(dense, up, config.towers)
    mlp_only = [_mlp_only_spec(layers)]
    result = MultipletResult(model=dense)
    stages: list[nn.Module] = []
    n = len(data["input_ids"])
    if config.recipe == "multiplet":
        stages.append(dense)
        labels = pair_clusters(dense, data, k, config.seed)
        for s in range(1, num_e):
            result.labels.append(labels)
            idx = cluster_batches(labels, config.batch_size, config.seed + s)
            tuned = copy.deepcopy(dense)
            losses, trained = fine_tune_pairs(
                tuned,
                [_take(data, i) for i in idx],
                config.stage_steps,
                config.stage_lr,
                mlp_only,
                0.0,
                config.seed + s,
            )
            result.stage_losses.append(losses)
            result.trainable[f"stage{s}"] = trained
            stages.append(tuned)
            new = pair_clusters(tuned, data, k, config.seed + s)
            _, labels = torch.unique(labels * (k * k) + new, return_inverse=True)
    else:
        img, txt = embed_pairs(dense, data)
        _, labels = kmeans(torch.cat([img, txt], dim=-1), num_e, seed=config.seed)
        result.labels.append(labels)
        for c in range(num_e):
            member = torch.nonzero(labels == c).flatten()
            if len(member) < 2:
                raise ValueError(f"per_cluster_only: cluster {c} has {len(member)} pair(s); give more data")
            tuned = copy.deepcopy(dense)
            idx = list(member.split(config.batch_size))
            idx = [b for b in idx if len(b) >= 2] or [member]
            losses, trained = fine_tune_pairs(
                tuned,
                [_take(data, i) for i in idx],
                config.stage_steps,
                config.stage_lr,
                mlp_only,
                0.0,
                config.seed + c,
            )
            result.stage_losses.append(losses)
            result.trainable[f"cluster{c}"] = trained
            stages.append(tuned)
    moe = upcycle_vision(dense, up, config.towers)
    with torch.no_grad():
        for prefix, ids in layers.items():
            for i in ids:
                mlp = moe.get_submodule(f"{prefix}.layers.{i}.mlp")
                ffns = [m.get_submodule(f"{prefix}.layers.{i}.mlp") for m in stages]
                mlp.experts.w_in.copy_(torch.stack([f.w_in.weight for f in ffns]))
                mlp.experts.b_in.copy_(torch.stack([f.w_in.bias for f in ffns]))
                mlp.experts.w_out.copy_(torch.stack([f.w_out.weight for f in ffns]))
                mlp.experts.b_out.copy_(torch.stack([f.w_out.bias for f in ffns]))
    if config.router_steps:
        gen = torch.Generator().manual_seed(config.seed)
        batches = [
            _take(data, torch.randperm(n, generator=gen)[: config.batch_size])
            for _ in range(config.router_steps)
        ]
        losses, trained = fine_tune_pairs(
            moe,
            batches,
            config.router_steps,
            config.router_lr,
            ["all_but_router"],
            config.aux_loss_coef,
            config.seed,
        )
        result.stage_losses.append(losses)
        result.trainable["router"] = trained
    result.model = moe.eval()
    return result
