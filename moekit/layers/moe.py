"""The MoE layer: a drop-in replacement for a transformer FFN.

Shape legend: T = tokens (all leading dims flattened), D = model width, E = experts scored by the
router (FFN then zero, copy, constant), K = slots per token, C = constant experts.

Forward runs as route -> (capacity) -> permute -> expert compute -> combine, plus the MoE++
zero-computation experts, the shared expert and the PR-MoE residual branch. It returns
:class:`MoEOutput`; aux losses are unweighted and statistics are tensors, so nothing is kept in
module or global state between calls.

Gating residuals (MoE++): pass ``out.routing.router_logits`` of one MoE layer as
``prev_logits`` of the next. The model does this; the first MoE layer gets ``None``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from moekit.layers import losses
from moekit.layers.config import FFNConfig, MoEConfig
from moekit.layers.dispatch import Dispatcher, LocalDispatcher
from moekit.layers.experts import BiasedExpertWeights, ExpertWeights, FeedForward, StackedExpertWeights
from moekit.layers.lora import LoRAExpertWeights
from moekit.layers.router import Router, RouterOutput, apply_capacity


class RoutingOverride(Protocol):
    """Replaces a layer's routing for a while (see :meth:`MoELayer.override_routing`).

    Called as ``override(router, x_TD, token_mask_T, prev_logits_TE, k) -> RouterOutput`` in
    place of ``router(x_TD, token_mask_T, prev_logits_TE, k)``; it may call the router itself.
    """

    def __call__(
        self,
        router: Router,
        x_TD: Tensor,
        token_mask_T: Tensor | None,
        prev_logits_TE: Tensor | None,
        k: int | None,
    ) -> RouterOutput: ...


@dataclass
class RoutingInfo:
    """What one MoE layer did in one forward. Tensors only (no ``.item()``), so it compiles.

    This is also the record that routing traces write to disk. The statistics are properties
    computed on access from the stored tensors, so a forward that never reads them (decoding)
    does not pay for them.

    Attributes:
        expert_ids: ``[T, K_max]`` int64 expert ids per token, -1 where a slot is unused.
        weights: ``[T, K_max]`` combine weights, 0 where unused.
        router_logits: ``[T, E]`` router logits (after the gating residual).
        router_probs: ``[T, E]`` routing distribution (softmax, or normalised sigmoid scores).
        choice_ids: ``[T, K_max]`` expert ids chosen before capacity dropping.
        token_mask: ``[T]`` bool, False for padding, or None when every token is real.
    """

    expert_ids: Tensor
    weights: Tensor
    router_logits: Tensor
    router_probs: Tensor
    choice_ids: Tensor
    token_mask: Tensor | None = None

    @property
    def tokens_per_expert(self) -> Tensor:
        """``[E]`` float32 assignments each expert computed (after capacity; padding excluded)."""
        return losses.assignment_counts(self.expert_ids, self.router_logits.shape[-1])

    @property
    def num_dropped(self) -> Tensor:
        """Scalar: assignments dropped by capacity."""
        return (self.choice_ids >= 0).sum() - (self.expert_ids >= 0).sum()

    @property
    def router_entropy(self) -> Tensor:
        """Scalar: mean routing entropy over real tokens, in nats (detached)."""
        return losses.router_entropy(self.router_probs.detach(), self.token_mask)

    @property
    def experts_per_token(self) -> Tensor:
        """Scalar: mean number of experts used per real token."""
        used_T = (self.expert_ids >= 0).sum(-1).to(torch.float32)
        if self.token_mask is None:
            return used_T.mean()
        return (used_T * self.token_mask).sum() / self.token_mask.sum().clamp_min(1)


class AuxLosses(Mapping):
    """A read-only dict of unweighted scalar aux losses, each computed on first access.

    Decoding never reads them, so it never pays for them; training reads the ones it weights.
    """

    def __init__(self, thunks: dict[str, Callable[[], Tensor]]) -> None:
        self._thunks = thunks
        self._values: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._values:
            self._values[name] = self._thunks[name]()
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._thunks)

    def __len__(self) -> int:
        return len(self._thunks)

    def __repr__(self) -> str:
        return f"AuxLosses({sorted(self._thunks)})"


@dataclass
class MoEOutput:
    """Result of :meth:`MoELayer.forward`.

    Attributes:
        hidden: output ``[..., D]``, the shape of the input.
        routing: the layer's :class:`RoutingInfo`.
        aux_losses: unweighted scalar losses: ``load_balance``, ``load_balance_first``,
            ``seq_balance``, ``z_loss`` and ``entropy`` (see :mod:`moekit.layers.losses`).
        backend: the expert compute path that actually ran (``"eager"``, ``"sorted"``,
            ``"grouped_mm"``, or a dispatcher's own name such as ``"all_to_all"``/``"offload"``).
        moe_input: the layer's input ``[..., D]`` (what a pre-gated next layer routes from).
    """

    hidden: Tensor
    routing: RoutingInfo
    aux_losses: Mapping[str, Tensor] = field(default_factory=dict)
    backend: str = ""
    moe_input: Tensor | None = None


def build_expert_storage(config: MoEConfig) -> ExpertWeights:
    """The storage ``config`` asks for: stacked full experts (biased with ``ffn_bias``), or LoRA
    experts over one frozen base FFN (``expert_kind="lora"``)."""
    swiglu = {"swiglu_alpha": config.swiglu_alpha, "swiglu_limit": config.swiglu_limit}
    if config.expert_kind == "lora":
        return LoRAExpertWeights(
            config.num_experts, config.dim, config.ffn_dim, config.activation,
            rank=config.lora_rank, alpha=config.lora_alpha, bias=config.ffn_bias, **swiglu,
        )  # fmt: skip
    storage = BiasedExpertWeights if config.ffn_bias else StackedExpertWeights
    return storage(config.num_experts, config.dim, config.ffn_dim, config.activation, **swiglu)


class MoELayer(nn.Module):
    """Mixture-of-Experts FFN built from a :class:`MoEConfig`.

    Submodules and fields:
        router: :class:`Router`.
        experts: :class:`ExpertWeights`, the storage (``StackedExpertWeights`` unless replaced).
        dispatcher: :class:`~moekit.layers.dispatch.Dispatcher` that moves rows to the storage
            (``LocalDispatcher`` unless replaced by expert parallelism or offloading).
        routing_override: a :class:`RoutingOverride` used instead of the router, or None; set it
            with :meth:`override_routing`.
        stats_reduce: sums a tensor over the data/expert-parallel group (with autograd) so
            balance statistics cover the global batch; None on a single process.
        const_gate ``[C, 2, D]`` and const_vec ``[C, D]``: MoE++ constant experts.
        shared: dense shared expert, with ``shared_gate`` (``Linear(D, 1)``) when gated.
        output_bias: ``[D]`` added to the routed output (``config.output_bias``), else None.
        residual_mlp and residual_coef (``Linear(D, 2)``): PR-MoE residual branch.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts: ExpertWeights = build_expert_storage(config)
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.routing_override: RoutingOverride | None = None
        num_c = config.num_constant_experts
        if num_c:
            self.const_gate = nn.Parameter(torch.empty(num_c, 2, config.dim))
            nn.init.normal_(self.const_gate, std=config.dim**-0.5)
            self.const_vec = nn.Parameter(torch.randn(num_c, config.dim))
        if config.shared_ffn_dim:
            self.shared = FeedForward(
                FFNConfig(dim=config.dim, ffn_dim=config.shared_ffn_dim, activation=config.activation)
            )
            self.shared_gate = nn.Linear(config.dim, 1, bias=False) if config.shared_expert_gate else None
        if config.residual_moe:
            self.residual_mlp = FeedForward(
                FFNConfig(dim=config.dim, ffn_dim=config.ffn_dim, activation=config.activation)
            )
            self.residual_coef = nn.Linear(config.dim, 2)
        self.output_bias = nn.Parameter(torch.zeros(config.dim)) if config.output_bias else None
        self.stats_reduce: Callable[[Tensor], Tensor] | None = None
        self.register_buffer("balance_weight", torch.empty(config.num_total_experts), persistent=False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Computes the non-persistent ``balance_weight`` ``[E]``: 1 for FFN experts and
        ``zero_expert_tau`` for MoE++ zero-computation experts. No file holds it, so a model built
        on the meta device calls this after getting real memory."""
        self.balance_weight.fill_(1.0)
        self.balance_weight[self.config.num_experts :] = self.config.zero_expert_tau

    @contextlib.contextmanager
    def override_routing(self, override: RoutingOverride | None) -> Iterator[None]:
        """Within the block, :meth:`forward` routes with ``override`` instead of the router; the
        previous override (usually None) is restored on exit, even on error."""
        previous = self.routing_override
        self.routing_override = override
        try:
            yield
        finally:
            self.routing_override = previous

    @property
    def supports_fast_decode(self) -> bool:
        """Whether a decode step may route with :meth:`Router.route_small` and run the experts
        from the storage's stacked weights directly, with the same result as :meth:`forward`."""
        cfg = self.config
        return (
            self.routing_override is None
            and self.router.supports_route_small
            and not cfg.num_tasks
            and self.dispatcher.supports_fast_decode
            and self.experts.supports_decode_token
            and cfg.capacity_factor is None
            and not cfg.residual_moe
            and cfg.num_experts == cfg.num_total_experts
            and not cfg.weights_on_input
            and not cfg.output_bias
        )

    @property
    def zero_ids(self) -> range:
        """Router indices of the zero experts."""
        start = self.config.num_experts
        return range(start, start + self.config.num_zero_experts)

    @property
    def copy_ids(self) -> range:
        """Router indices of the copy experts."""
        start = self.config.num_experts + self.config.num_zero_experts
        return range(start, start + self.config.num_copy_experts)

    @property
    def constant_ids(self) -> range:
        """Router indices of the constant experts."""
        start = self.config.num_experts + self.config.num_zero_experts + self.config.num_copy_experts
        return range(start, start + self.config.num_constant_experts)

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        prev_logits: Tensor | None = None,
        k: int | None = None,
        task_ids: Tensor | None = None,
        router_input: Tensor | None = None,
    ) -> MoEOutput:
        """Routes and computes.

        Args:
            x: ``[..., D]`` token states.
            token_mask: ``[...]`` bool, False for padding: excluded from compute, counts,
                capacity, balance statistics and bias updates. Padding rows get only the shared
                and residual branches.
            prev_logits: ``[..., E]`` previous MoE layer's ``routing.router_logits`` (gating residual).
            k: top-k for this call (any k in [1, E]; SMoE-Dropout's self-slimming, dynamic k).
            task_ids: int64 ``[...]`` task of each token (or one scalar for all), required exactly
                when ``config.num_tasks > 0`` (task-level MoE).
            router_input: ``[..., D]`` what the router reads instead of ``x`` (Pre-gated MoE: the
                previous MoE layer's input); None routes from ``x``.

        Returns:
            :class:`MoEOutput` with ``hidden`` shaped like ``x``.
        """
        cfg = self.config
        lead_shape = x.shape[:-1]
        x_TD = x.reshape(-1, cfg.dim)
        num_t = x_TD.shape[0]
        mask_T = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        prev_TE = None if prev_logits is None else prev_logits.reshape(num_t, -1)
        route_TD = x_TD if router_input is None else router_input.reshape(num_t, cfg.dim)

        if cfg.num_tasks:
            if task_ids is None:
                raise ValueError(f"this MoE layer routes per task (num_tasks={cfg.num_tasks}); pass task_ids")
            task_T = task_ids.reshape(-1).to(device=x.device, dtype=torch.long).expand(num_t)
            route = self.router(route_TD, mask_T, prev_TE, k, task_ids_T=task_T)
        elif task_ids is not None:
            raise ValueError("task_ids given to an MoE layer without tasks (num_tasks=0)")
        elif self.routing_override is None:
            route = self.router(route_TD, mask_T, prev_TE, k)
        else:
            route = self.routing_override(self.router, route_TD, mask_T, prev_TE, k)
        expert_ids_TK, weights_TK = route.expert_ids_TK, route.weights_TK
        if cfg.capacity_factor is not None and cfg.router_type != "expert_choice":
            num_valid = torch.tensor(num_t, device=x.device) if mask_T is None else mask_T.sum()
            expert_ids_TK, weights_TK = apply_capacity(
                expert_ids_TK,
                weights_TK,
                cfg.num_total_experts,
                cfg.capacity_factor,
                cfg.min_capacity,
                cfg.drop_policy,
                num_valid,
                k or cfg.top_k,
            )

        if cfg.weights_on_input:
            out_TD, backend = self._dispatch_weighted_inputs(x_TD, expert_ids_TK, weights_TK)
        else:
            out_TD, backend = self.dispatcher.dispatch(
                self.experts, x_TD, expert_ids_TK, weights_TK, cfg.backend
            )
        if self.output_bias is not None:
            out_TD = out_TD + self.output_bias.to(out_TD.dtype)
        if cfg.num_copy_experts or cfg.num_constant_experts:
            out_TD = out_TD + self._zero_compute_experts(x_TD, expert_ids_TK, weights_TK)
        if cfg.residual_moe:
            coef_T2 = torch.softmax(self.residual_coef(x_TD), dim=-1)
            out_TD = out_TD * coef_T2[:, :1] + self.residual_mlp(x_TD) * coef_T2[:, 1:]
        if cfg.shared_ffn_dim:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD

        routing, aux = self._statistics(route, expert_ids_TK, weights_TK, mask_T, lead_shape)
        return MoEOutput(out_TD.reshape(*lead_shape, cfg.dim), routing, aux, backend, x)

    def _dispatch_weighted_inputs(
        self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[Tensor, str]:
        # Llama 4: one row per (token, slot) holding w * x, each sent to its expert with weight 1,
        # so any dispatcher (local, offload, expert parallel) runs it unchanged.
        num_t, num_k = expert_ids_TK.shape
        rows_ND = (x_TD.unsqueeze(1) * weights_TK.to(x_TD.dtype).unsqueeze(-1)).reshape(num_t * num_k, -1)
        ones_N1 = torch.ones(num_t * num_k, 1, dtype=weights_TK.dtype, device=x_TD.device)
        out_ND, backend = self.dispatcher.dispatch(
            self.experts, rows_ND, expert_ids_TK.reshape(-1, 1), ones_N1, self.config.backend
        )
        return out_ND.view(num_t, num_k, -1).sum(1), backend

    def _zero_compute_experts(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        # Dense [T, E] weight table: cheap (E is small) and handles any number of slots per token.
        num_e = self.config.num_total_experts
        valid_TK = expert_ids_TK >= 0
        w_TE = weights_TK.new_zeros(x_TD.shape[0], num_e + 1)
        w_TE.scatter_add_(1, torch.where(valid_TK, expert_ids_TK, num_e), weights_TK * valid_TK)
        w_TE = w_TE[:, :num_e].to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD)
        if self.config.num_copy_experts:
            copy = self.copy_ids
            out_TD = out_TD + w_TE[:, copy.start : copy.stop].sum(-1, keepdim=True) * x_TD
        if self.config.num_constant_experts:
            const = self.constant_ids
            w_TC = w_TE[:, const.start : const.stop]
            alpha_TC2 = torch.softmax(torch.einsum("td,cjd->tcj", x_TD, self.const_gate), dim=-1)
            out_TD = out_TD + (w_TC * alpha_TC2[..., 0]).sum(-1, keepdim=True) * x_TD
            out_TD = out_TD + (w_TC * alpha_TC2[..., 1]) @ self.const_vec
        return out_TD

    def _statistics(
        self, route, expert_ids_TK: Tensor, weights_TK: Tensor, mask_T: Tensor | None, lead_shape: torch.Size
    ) -> tuple[RoutingInfo, AuxLosses]:
        num_e = self.config.num_total_experts
        probs_TE, logits_TE, choice_TK = route.probs_TE, route.logits_TE, route.choice_ids_TK
        eta_E = self.balance_weight if self.config.num_experts < num_e else None
        reduce = self.stats_reduce
        routing = RoutingInfo(expert_ids_TK, weights_TK, logits_TE, probs_TE, choice_TK, mask_T)

        def seq_balance() -> Tensor:
            if len(lead_shape) < 2:
                return losses.load_balance_loss(probs_TE, choice_TK, mask_T, eta_E, reduce=reduce)
            seq_len = lead_shape[-1]
            num_b = probs_TE.shape[0] // max(seq_len, 1)
            return losses.seq_balance_loss(
                probs_TE.view(num_b, seq_len, num_e),
                choice_TK.view(num_b, seq_len, -1),
                None if mask_T is None else mask_T.view(num_b, seq_len),
                eta_E,
                reduce=reduce,
            )

        aux = AuxLosses(
            {
                "load_balance": lambda: losses.load_balance_loss(
                    probs_TE, choice_TK, mask_T, eta_E, reduce=reduce
                ),
                "load_balance_first": lambda: losses.load_balance_loss(
                    probs_TE, choice_TK, mask_T, eta_E, first_choice_only=True, reduce=reduce
                ),
                "seq_balance": seq_balance,
                "z_loss": lambda: losses.z_loss(logits_TE, mask_T, reduce),
                "entropy": lambda: losses.router_entropy(probs_TE, mask_T, reduce),
            }
        )
        return routing, aux


def require_plain_expert_math(layers: list[MoELayer], what: str) -> None:
    """ValueError (one line) when an MoE layer's experts have biases or the clamped SwiGLU (GPT-OSS):
    tools that rebuild or re-store expert weights as two bias-free matrices (offloading,
    quantization) would otherwise drop them silently."""
    for index, layer in enumerate(layers):
        cfg = layer.config
        if cfg.ffn_bias:
            feature = "expert biases (moe.ffn_bias=True)"
        elif cfg.activation == "swiglu_clamped":
            feature = "the clamped SwiGLU (activation='swiglu_clamped')"
        elif cfg.expert_kind == "lora":
            feature = "LoRA experts (expert_kind='lora'; merge_lora_experts turns them into full experts)"
        else:
            continue
        raise ValueError(f"{what}: MoE layer {index} has {feature}, which {what} does not handle")


def dense_equivalent(config: MoEConfig) -> FFNConfig:
    """The dense FFN config with the same active FLOPs as a token-choice MoE layer (width k*F)."""
    return FFNConfig(dim=config.dim, ffn_dim=config.ffn_dim * config.top_k, activation=config.activation)
