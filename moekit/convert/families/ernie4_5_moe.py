"""ERNIE 4.5 MoE (``model_type: "ernie4_5_moe"``, ``Ernie4_5_MoeForCausalLM``).

GQA attention with Llama names; RoPE rotates interleaved pairs (``rope_interleave=True`` on GQA
attention). Routing: softmax scores; ``moe_statics.e_score_correction_bias`` (``[1, E]``) is added
to the scores for the choice only (the router's ``expert_bias``); the chosen scores are
renormalised (``norm_topk_prob``; ``moe_norm_min`` clamps the sum, which never binds while
``moe_norm_min <= moe_k / moe_num_experts`` because the top-k mass is at least that, so larger
values are refused). ``moe_num_shared_experts * moe_intermediate_size`` -> an ungated shared
expert. MoE layers are ``moe_layer_start_index <= i <= moe_layer_end_index`` with
``(i + 1) % moe_layer_interval == 0`` (explicit layer indices in moekit). Refused: ``use_bias``
(biases on every projection). Multi-token-prediction tensors (``mtp*``) are skipped.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Piece, Target, refuse_export
from moekit.convert.families.llama import LlamaAdapter
from moekit.convert.families.qwen2_moe import qwen_expert_targets
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig


def ernie_moe_layers(num_layers: int, start: int, end: int, interval: int) -> tuple[int, ...]:
    """The MoE layer indices of an ERNIE placement (``end=-1`` means the last layer)."""
    end = num_layers - 1 if end == -1 else end
    return tuple(i for i in range(num_layers) if start <= i <= end and (i + 1) % interval == 0)


class Ernie45MoeAdapter(LlamaAdapter):
    """ERNIE 4.5 MoE: softmax routing with a correction bias, shared experts, interleaved RoPE."""

    model_type = "ernie4_5_moe"
    architecture = "Ernie4_5_MoeForCausalLM"
    fp32_routers = True  # gate.weight and e_score_correction_bias stay float32, as in transformers
    model_features = frozenset({"rope_interleave"})
    defaults = LlamaAdapter.defaults | {
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "use_bias": False,
        "moe_intermediate_size": 1536,
        "moe_k": 6,
        "moe_num_experts": 64,
        "moe_num_shared_experts": 2,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": -1,
        "moe_layer_interval": 1,
        "moe_norm_min": 1e-12,
        "router_aux_loss_coef": 0.001,
    }
    default_rope_theta = 500000.0

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Interleaved RoPE; no biases."""
        r.refuse("use_bias", False, "biases on every projection")
        return {"rope_interleave": True}

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        num_layers = kwargs["num_layers"]
        num_experts = int(r.first("moe_num_experts", "num_experts"))
        top_k = int(r.first("moe_k", "num_experts_per_tok"))
        norm_min = float(r.get("moe_norm_min"))
        if norm_min > top_k / num_experts:
            raise ValueError(
                f"ernie4_5_moe config.json: unsupported option moe_norm_min={norm_min} (above moe_k / "
                f"moe_num_experts = {top_k / num_experts}, where the clamp would change the weights)"
            )
        ffn = r.require("moe_intermediate_size")
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=ffn,
            num_experts=num_experts,
            top_k=top_k,
            norm_topk_prob=True,
            use_expert_bias=True,
            shared_ffn_dim=int(r.get("moe_num_shared_experts") or 0) * ffn,
        )
        layers = ernie_moe_layers(
            num_layers,
            int(r.get("moe_layer_start_index")),
            int(r.get("moe_layer_end_index")),
            int(r.get("moe_layer_interval")),
        )
        return ModelConfig(
            **kwargs,
            ffn_dim=r.require("intermediate_size"),
            moe=moe,
            moe_placement="explicit",
            moe_layer_indices=layers,
            aux_loss_coef=float(r.get("router_aux_loss_coef")),
        )

    def placement_to_hf(self, cfg: ModelConfig) -> dict[str, int]:
        """``moe_layer_start_index``/``end_index``/``interval`` giving exactly the MoE layers."""
        ids = tuple(cfg.moe_layer_ids)
        start, end = ids[0], ids[-1]
        for interval in range(1, cfg.num_layers + 1):
            if ernie_moe_layers(cfg.num_layers, start, end, interval) == ids:
                return {
                    "moe_layer_start_index": start,
                    "moe_layer_end_index": end,
                    "moe_layer_interval": interval,
                }
        raise refuse_export(
            self.model_type, "moe_layer_indices", list(ids), "not a start/end/interval range of layers"
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg, allowed={"use_expert_bias", "shared_ffn_dim"})
        self.check_attention(cfg)
        if not cfg.rope_interleave:
            raise refuse_export(self.model_type, "rope_interleave", False, "ERNIE rotates interleaved pairs")
        if not (moe.norm_topk_prob and moe.use_expert_bias):
            raise refuse_export(
                self.model_type,
                "moe.norm_topk_prob/use_expert_bias",
                (moe.norm_topk_prob, moe.use_expert_bias),
                "ERNIE renormalises and has a correction bias",
            )
        if moe.shared_ffn_dim % moe.ffn_dim:
            raise refuse_export(
                self.model_type, "moe.shared_ffn_dim", moe.shared_ffn_dim, "must be n_shared * ffn_dim"
            )
        return (
            self.common_to_hf(cfg)
            | {
                "use_bias": False,
                "intermediate_size": cfg.ffn_dim or moe.ffn_dim,
                "moe_intermediate_size": moe.ffn_dim,
                "moe_num_experts": moe.num_experts,
                "moe_k": moe.top_k,
                "moe_num_shared_experts": moe.shared_ffn_dim // moe.ffn_dim,
                "moe_norm_min": 1e-12,
                "router_aux_loss_coef": cfg.aux_loss_coef,
                "output_router_logits": False,
            }
            | self.placement_to_hf(cfg)
        )

    def matches(self, cfg: ModelConfig) -> bool:
        """GQA attention with interleaved RoPE."""
        return cfg.attention_type == "mha" and cfg.rope_interleave and cfg.moe is not None

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router, correction bias (``[1, E]``), experts and the shared expert."""
        src, dst = self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp."
        moe = cfg.moe_config(i)
        out = qwen_expert_targets(src, dst, moe.num_experts, moe.ffn_dim)
        bias_keys = (
            f"{src}moe_statics.e_score_correction_bias",
            f"{src}gate.moe_statics.e_score_correction_bias",
        )
        # (None,) views moekit's [E] bias as [1, E], the checkpoint's shape.
        out.append(Target(f"{dst}router.expert_bias", [[Piece(k, (None,))] for k in bias_keys]))
        if moe.shared_ffn_dim:
            out += self.dense_mlp_targets(i, moe.shared_ffn_dim, f"{src}shared_experts.", f"{dst}shared.")
        return out
