"""Configuration of one MoE layer (:class:`MoEConfig`) and of a dense FFN (:class:`FFNConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import JsonConfig, check_choice
from moekit.layers.strategies import ROUTER_STRATEGIES, strategy_for

ROUTER_TYPES = tuple(ROUTER_STRATEGIES)
SCORE_FUNCS = ("softmax", "sigmoid")
SOFTMAX_ORDERS = ("before_topk", "after_topk")
GROUP_SCORES = ("top2_sum", "max")
NOISE_TYPES = ("none", "jitter", "gaussian", "gumbel")
DROP_POLICIES = ("score", "position", "random")
ACTIVATIONS = ("swiglu", "gelu", "quick_gelu", "swiglu_clamped", "gelu_tanh")
TASK_ROUTINGS = ("embed", "multi_gate")
BACKENDS = ("auto", "eager", "sorted", "grouped_mm")
EXPERT_KINDS = ("ffn", "lora")


@dataclass(kw_only=True)
class FFNConfig(JsonConfig):
    """A dense feed-forward block.

    Attributes:
        dim: model width D.
        ffn_dim: hidden width F.
        activation: ``"swiglu"`` (gate/up/down), ``"gelu"`` (up/down), ``"gelu_tanh"`` (up/down,
            the tanh approximation: SigLIP's ``gelu_pytorch_tanh``) or ``"quick_gelu"``
            (up/down with ``x * sigmoid(1.702 x)``, OpenAI CLIP).
        bias: add biases to the projections.
    """

    dim: int
    ffn_dim: int
    activation: str = "swiglu"
    bias: bool = False

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.ffn_dim <= 0:
            raise ValueError(f"FFNConfig: dim and ffn_dim must be positive, got {self.dim}, {self.ffn_dim}")
        check_choice("FFNConfig", "activation", self.activation, ACTIVATIONS)


@dataclass(kw_only=True)
class MoEConfig(JsonConfig):
    """Everything that defines one MoE layer. Defaults give a Mixtral-style top-2 softmax layer.

    Experts:
        dim: model width D.
        ffn_dim: hidden width F of each FFN expert.
        num_experts: number of FFN experts.
        num_zero_experts, num_copy_experts, num_constant_experts: MoE++ zero-computation experts,
            indexed after the FFN experts in the order zero, copy, constant.
        activation: ``"swiglu"``, ``"gelu"`` or ``"quick_gelu"``.
        shared_ffn_dim: width of the always-on shared expert(s), 0 for none (DeepSeek's
            ``n_shared_experts * moe_intermediate_size``, Qwen2-MoE's ``shared_expert_intermediate_size``).
        shared_expert_gate: scale the shared expert by ``sigmoid(w . x)`` (Qwen2-MoE).
        residual_moe: DeepSpeed PR-MoE residual layer: a dense MLP of width ``ffn_dim`` mixed with the
            routed output through a learned 2-way softmax.

    Router:
        router_type: ``"topk"`` (token choice), ``"top_p"`` (dynamic), ``"random_fixed"``
            (SMoE-Dropout: frozen random router, softmax over the chosen logits), ``"expert_choice"``,
            ``"centroid"`` (Moirai-MoE token-cluster gating: nearest of E fixed k-means centroids).
        top_k: experts per token for token-choice routers; capacity multiplier for expert choice.
        score_func: ``"softmax"`` or ``"sigmoid"`` scores.
        softmax_order: ``"before_topk"`` (Mixtral/Qwen/OLMoE) or ``"after_topk"`` (softmax over the
            chosen logits only).
        norm_topk_prob: renormalise the chosen weights to sum to 1.
        routed_scaling_factor: multiplies the routed weights (DeepSeek-V3: 2.5).
        num_expert_groups, num_limited_groups: group-limited routing; tokens choose experts only
            inside their best ``num_limited_groups`` groups (DeepSeek-V3: 8 and 4).
        group_score: how a group is scored: ``"top2_sum"`` (V3) or ``"max"`` (V2).
        use_expert_bias: keep a per-expert bias that changes only which experts are chosen, never the
            weights (aux-loss-free balancing; DeepSeek-V3's ``e_score_correction_bias``).
        router_bias: the router linear has a bias term.
        router_frozen: the router does not train (implied by ``random_fixed``).
        top_p: threshold of top-p routing, in (0, 1].
        min_k, max_k: bounds on experts per token for top-p; ``max_k=None`` means no cap.
        top_p_renormalize: renormalise top-p weights (off in the official code).
        noise: router noise in training: ``"jitter"`` multiplies inputs by U(1-eps, 1+eps),
            ``"gaussian"`` adds eps*N(0,1)/E to logits, ``"gumbel"`` perturbs the choice only.
        noise_eps: noise scale.
        gating_residual: MoE++ gating residual; the layer adds ``W_g @ prev_logits`` to its logits.
        zero_expert_tau: weight of zero-computation experts in the heterogeneous balance loss.
        centroid_farthest: ``router_type="centroid"`` only: route to the *farthest* centroids, as
            the released Moirai-MoE code does (a compatibility flag for its checkpoints; new models
            route to the nearest).

    Capacity:
        capacity_factor: ``None`` is dropless. Otherwise each expert takes at most
            ``max(ceil(cf * T * k / E), min_capacity)`` assignments (expert choice: ``ceil(cf*T*k/E)``
            tokens, default cf 1.0).
        min_capacity: lower bound on capacity.
        drop_policy: which assignments survive: by ``"score"``, by ``"position"`` (first choices
            first, then earlier tokens), or ``"random"`` (random token selection, RTS).

    Expert kind:
        expert_kind: ``"ffn"`` (each expert a full FFN) or ``"lora"`` (Uni-MoE: one frozen dense
            base FFN shared by all experts, and per expert a low-rank adapter ``B_e A_e`` on every
            projection: gate, up and down for SwiGLU, up and down for GELU, so expert e is the
            FFN with weights ``W + (lora_alpha / lora_rank) B_e A_e``).
        lora_rank: r of the LoRA experts.
        lora_alpha: the LoRA scale numerator (scale = alpha / r; Uni-MoE: r=8, alpha=16).

    Compute:
        backend: expert compute backend: ``"auto"``, ``"eager"``, ``"sorted"``, ``"grouped_mm"``.

    Router strategies added later (neutral unless their ``router_type`` is chosen):
        sparsemixer_eps: the relative logit margin of ``router_type="sparsemixer"`` (PhiMoE's
            ``router_jitter_noise``; it is not noise, it applies at inference too).
    Vision options (neutral defaults):
        ffn_bias: each FFN expert has biases on both projections (ViT/CLIP MLPs, GPT-OSS), so a
            biased dense FFN upcycles exactly. Biased experts run the per-expert loop (no stacked
            fast paths).
        output_bias: one bias ``[D]`` added to the layer's routed output, shared by all experts
            (JetMoE's ``mlp.bias``).
        weights_on_input: each routed expert sees its token scaled by the routing weight and its
            output joins unweighted, ``sum_k E_k(w_k x)`` instead of ``sum_k w_k E_k(x)`` (Llama 4).
        swiglu_alpha, swiglu_limit: the constants of ``activation="swiglu_clamped"`` (GPT-OSS:
            ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``);
            read by that activation alone.
        num_tasks: 0, or the number of tasks of a task-level MoE (M3ViT): the router then takes a
            task id per token and conditions its logits on it.
        task_routing: ``"embed"`` (one shared router over ``[x ; e_task]``, i.e. a learned
            per-task logit vector ``task_logits [num_tasks, E]`` added to ``x W^T``) or
            ``"multi_gate"`` (a gate per task: ``x (W + W_task)^T``).
        task_num_experts: 0, or a hard per-task expert budget (``"embed"`` only): task t routes
            only among the ``task_num_experts`` experts with the largest ``task_logits[t]``, so
            serving one task needs only those experts loaded (Edge-MoE). The set follows the
            learned task vector; it is the same for every input.
    """

    dim: int
    ffn_dim: int
    num_experts: int = 8
    num_zero_experts: int = 0
    num_copy_experts: int = 0
    num_constant_experts: int = 0
    activation: str = "swiglu"
    shared_ffn_dim: int = 0
    shared_expert_gate: bool = False
    residual_moe: bool = False

    router_type: str = "topk"
    top_k: int = 2
    score_func: str = "softmax"
    softmax_order: str = "before_topk"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_expert_groups: int = 1
    num_limited_groups: int = 1
    group_score: str = "top2_sum"
    use_expert_bias: bool = False
    router_bias: bool = False
    router_frozen: bool = False
    top_p: float = 0.4
    min_k: int = 1
    max_k: int | None = None
    top_p_renormalize: bool = False
    noise: str = "none"
    noise_eps: float = 1e-2
    gating_residual: bool = False
    zero_expert_tau: float = 0.75
    centroid_farthest: bool = False

    capacity_factor: float | None = None
    min_capacity: int = 4
    drop_policy: str = "score"

    expert_kind: str = "ffn"
    lora_rank: int = 8
    lora_alpha: float = 16.0

    backend: str = "auto"

    sparsemixer_eps: float = 0.01
    ffn_bias: bool = False
    weights_on_input: bool = False
    output_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    num_tasks: int = 0
    task_routing: str = "embed"
    task_num_experts: int = 0

    def __post_init__(self) -> None:
        name = "MoEConfig"
        if self.dim <= 0:
            raise ValueError(f"{name}.dim must be positive, got {self.dim}")
        if self.ffn_dim <= 0:
            raise ValueError(f"{name}.ffn_dim must be positive, got {self.ffn_dim}")
        if self.num_experts < 1:
            raise ValueError(f"{name}.num_experts must be at least 1, got {self.num_experts}")
        for field in ("num_zero_experts", "num_copy_experts", "num_constant_experts", "shared_ffn_dim"):
            if getattr(self, field) < 0:
                raise ValueError(f"{name}.{field} must be >= 0, got {getattr(self, field)}")
        check_choice(name, "activation", self.activation, ACTIVATIONS)
        self._check_clamped_swiglu()
        check_choice(name, "router_type", self.router_type, ROUTER_TYPES)
        check_choice(name, "score_func", self.score_func, SCORE_FUNCS)
        check_choice(name, "softmax_order", self.softmax_order, SOFTMAX_ORDERS)
        check_choice(name, "group_score", self.group_score, GROUP_SCORES)
        check_choice(name, "noise", self.noise, NOISE_TYPES)
        check_choice(name, "drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice(name, "backend", self.backend, BACKENDS)
        check_choice(name, "task_routing", self.task_routing, TASK_ROUTINGS)
        self._check_lora()
        if self.num_tasks < 0:
            raise ValueError(f"{name}.num_tasks must be >= 0, got {self.num_tasks}")
        if self.num_tasks == 0 and self.task_routing != "embed":
            raise ValueError(f"{name}.task_routing={self.task_routing!r} needs num_tasks > 0")
        if self.task_num_experts:
            if not self.num_tasks or self.task_routing != "embed":
                raise ValueError(f"{name}.task_num_experts needs num_tasks > 0 and task_routing='embed'")
            if not self.top_k <= self.task_num_experts <= self.num_experts:
                raise ValueError(
                    f"{name}.task_num_experts={self.task_num_experts} must be in [top_k={self.top_k}, "
                    f"num_experts={self.num_experts}]"
                )
        if self.top_k < 1:
            raise ValueError(f"{name}.top_k must be >= 1, got {self.top_k}")
        if self.router_type != "expert_choice" and self.top_k > self.num_total_experts:
            raise ValueError(
                f"{name}.top_k={self.top_k} exceeds the number of experts ({self.num_total_experts}); "
                "lower top_k or add experts"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"{name}.top_p must be in (0, 1], got {self.top_p}")
        if self.min_k < 1 or self.min_k > self.num_total_experts:
            raise ValueError(f"{name}.min_k must be in [1, {self.num_total_experts}], got {self.min_k}")
        if self.max_k is not None and not (self.min_k <= self.max_k <= self.num_total_experts):
            raise ValueError(
                f"{name}.max_k must be in [min_k={self.min_k}, {self.num_total_experts}], got {self.max_k}"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"{name}.capacity_factor must be positive (or None for dropless), got {self.capacity_factor}"
            )
        if self.min_capacity < 0:
            raise ValueError(f"{name}.min_capacity must be >= 0, got {self.min_capacity}")
        if self.noise_eps < 0:
            raise ValueError(f"{name}.noise_eps must be >= 0, got {self.noise_eps}")
        if self.num_expert_groups < 1 or self.num_total_experts % self.num_expert_groups:
            raise ValueError(
                f"{name}.num_expert_groups={self.num_expert_groups} must divide the number of experts "
                f"({self.num_total_experts})"
            )
        if not (1 <= self.num_limited_groups <= self.num_expert_groups):
            raise ValueError(
                f"{name}.num_limited_groups must be in [1, num_expert_groups={self.num_expert_groups}], "
                f"got {self.num_limited_groups}"
            )
        if self.num_expert_groups > 1:
            per_group = self.num_total_experts // self.num_expert_groups
            if self.top_k > self.num_limited_groups * per_group:
                raise ValueError(
                    f"{name}.top_k={self.top_k} exceeds the experts reachable in num_limited_groups="
                    f"{self.num_limited_groups} groups of {per_group}"
                )
            if self.router_type != "topk":
                raise ValueError(f"{name}: group-limited routing needs router_type='topk'")
        if self.shared_expert_gate and self.shared_ffn_dim == 0:
            raise ValueError(f"{name}.shared_expert_gate needs shared_ffn_dim > 0")
        if self.sparsemixer_eps < 0:
            raise ValueError(f"{name}.sparsemixer_eps must be >= 0, got {self.sparsemixer_eps}")
        if self.router_type != "sparsemixer" and self.sparsemixer_eps != 0.01:
            raise ValueError(
                f"{name}.sparsemixer_eps={self.sparsemixer_eps} is only read by router_type='sparsemixer'"
            )
        if self.centroid_farthest and self.router_type != "centroid":
            raise ValueError(
                f"{name}.centroid_farthest applies to router_type='centroid', not {self.router_type!r}; remove it"
            )
        # Each router strategy rejects the fields it would silently ignore.
        strategy_for(self).check(self)

    def _check_lora(self) -> None:
        name = "MoEConfig"
        check_choice(name, "expert_kind", self.expert_kind, EXPERT_KINDS)
        if self.expert_kind != "lora":
            if (self.lora_rank, self.lora_alpha) != (8, 16.0):
                raise ValueError(
                    f"{name}.lora_rank/lora_alpha are only read by expert_kind='lora', not "
                    f"{self.expert_kind!r}; remove them"
                )
            return
        if self.lora_rank < 1:
            raise ValueError(f"{name}.lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"{name}.lora_alpha must be positive, got {self.lora_alpha}")

    def _check_clamped_swiglu(self) -> None:
        name = "MoEConfig"
        for field in ("swiglu_alpha", "swiglu_limit"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{name}.{field} must be positive, got {getattr(self, field)}")
        if self.activation != "swiglu_clamped" and (self.swiglu_alpha, self.swiglu_limit) != (1.702, 7.0):
            raise ValueError(
                f"{name}.swiglu_alpha/swiglu_limit are only read by activation='swiglu_clamped', "
                f"not {self.activation!r}; remove them"
            )
        if self.activation == "swiglu_clamped" and (self.shared_ffn_dim or self.residual_moe):
            raise ValueError(
                f"{name}: activation='swiglu_clamped' is for the routed experts only; a shared expert or "
                "residual_moe branch would not carry its constants"
            )

    @property
    def num_total_experts(self) -> int:
        """FFN experts plus zero-computation experts: the router's output width."""
        return self.num_experts + self.num_zero_experts + self.num_copy_experts + self.num_constant_experts

    @property
    def max_experts_per_token(self) -> int:
        """K_max: the width of the padded ``expert_ids``/``weights`` tensors."""
        if self.router_type == "top_p":
            return self.max_k if self.max_k is not None else self.num_total_experts
        if self.router_type == "expert_choice":
            return self.num_total_experts
        return self.top_k
