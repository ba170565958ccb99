"""DBRX (``model_type: "dbrx"``, ``DbrxForCausalLM``).

Config: ``d_model``, ``n_heads``, ``n_layers``, ``max_seq_len``, with nested ``attn_config``
(``kv_n_heads``, ``clip_qkv`` -> ``ModelConfig.clip_qkv``) and ``ffn_config`` (``ffn_hidden_size``,
``moe_num_experts``, ``moe_top_k``, ``moe_jitter_eps`` -> training input jitter, ``moe_loss_weight``
-> ``aux_loss_coef``, ``moe_normalize_expert_weights``: 1 renormalises the chosen softmax scores
(their L1 norm, ``norm_topk_prob``), None keeps them; other p-norms are refused). Norms are
``nn.LayerNorm`` without bias (``norm_type="layernorm"``, eps 1e-5).

Layout: ``transformer.wte``, ``transformer.blocks.{i}.norm_attn_norm.{norm_1, attn.Wqkv, attn.out_proj,
norm_2}``, ``transformer.blocks.{i}.ffn.router.layer``, ``transformer.norm_f``, ``lm_head``. ``Wqkv``
stacks q, k and v rows (split into moekit's q/k/v projections). The experts are three
``[E * F, D]`` matrices ``ffn.experts.mlp.{w1, v1, w2}``: gate, up, and the *transposed* down
projection of each expert stacked, which moekit's ``w_in [E, 2F, D]``/``w_out [E, D, F]`` take with
a reshape (and a transpose for ``w2``).

Refused: other activations, p-norms other than 1, ``tie_word_embeddings`` (transformers refuses
it too). Note that transformers 5.24's DBRX itself fails with ``clip_qkv=None`` (it clamps with no
bounds); moekit imports such configs, and its exports of them need a transformers that handles it.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Piece, Target, refuse_export
from moekit.convert.families.llama import LlamaAdapter
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig


class DbrxAdapter(LlamaAdapter):
    """DBRX: clipped fused qkv, bias-free LayerNorms, stacked expert matrices."""

    model_type = "dbrx"
    architecture = "DbrxForCausalLM"
    model_features = frozenset({"clip_qkv", "norm_type"})
    defaults = {"max_seq_len": 2048, "tie_word_embeddings": False, "initializer_range": 0.02}
    attn_defaults = {"kv_n_heads": 1, "clip_qkv": None, "attn_pdrop": 0.0}
    ffn_defaults = {
        "ffn_act_fn": {"name": "silu"},
        "ffn_hidden_size": 3584,
        "moe_num_experts": 4,
        "moe_top_k": 1,
        "moe_jitter_eps": None,
        "moe_loss_weight": 0.01,
        "moe_normalize_expert_weights": 1.0,
    }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        r.refuse("tie_word_embeddings", False, "transformers' DBRX never ties the LM head")
        attn = self.attn_defaults | dict(hf.get("attn_config") or {})
        ffn = self.ffn_defaults | dict(hf.get("ffn_config") or {})
        act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
        if act != "silu":
            raise ValueError(
                f"dbrx config.json: unsupported option ffn_config.ffn_act_fn={act!r} (moekit: SwiGLU)"
            )
        p_norm = ffn.get("moe_normalize_expert_weights")
        if p_norm not in (None, 1, 1.0):
            raise ValueError(
                f"dbrx config.json: unsupported option ffn_config.moe_normalize_expert_weights={p_norm!r} "
                "(moekit renormalises by the sum, the p=1 norm, or not at all)"
            )
        theta = (hf.get("rope_parameters") or {}).get("rope_theta") or attn.get("rope_theta") or 10000.0
        params = dict(hf.get("rope_parameters") or {}) | {"rope_theta": theta}
        _, scaling = HFConfigReader(hf | {"rope_parameters": params}, self.model_type, {}).rope(theta)
        num_heads = r.require("n_heads")
        dim = r.require("d_model")
        jitter = float(ffn.get("moe_jitter_eps") or 0.0)
        moe = MoEConfig(
            dim=dim,
            ffn_dim=int(ffn["ffn_hidden_size"]),
            num_experts=int(ffn["moe_num_experts"]),
            top_k=int(ffn["moe_top_k"]),
            norm_topk_prob=p_norm is not None,
            noise="jitter" if jitter > 0 else "none",
            noise_eps=jitter if jitter > 0 else 1e-2,
        )
        return ModelConfig(
            vocab_size=r.require("vocab_size"),
            dim=dim,
            num_layers=r.require("n_layers"),
            num_heads=num_heads,
            num_kv_heads=int(attn["kv_n_heads"]),
            rms_norm_eps=1e-5,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=r.get("max_seq_len"),
            initializer_range=float(r.get("initializer_range")),
            moe=moe,
            moe_placement="all",
            aux_loss_coef=float(ffn["moe_loss_weight"]),
            clip_qkv=None if attn["clip_qkv"] is None else float(attn["clip_qkv"]),
            norm_type="layernorm",
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg)
        self.check_attention(cfg)
        if cfg.norm_type != "layernorm" or cfg.rms_norm_eps != 1e-5:
            raise refuse_export(
                self.model_type, "norm_type", cfg.norm_type, "DBRX uses bias-free LayerNorms with eps 1e-5"
            )
        if cfg.head_dim is not None and cfg.head_dim * cfg.num_heads != cfg.dim:
            raise refuse_export(self.model_type, "head_dim", cfg.head_dim, "DBRX heads are d_model / n_heads")
        if cfg.num_moe_layers != cfg.num_layers:
            raise refuse_export(self.model_type, "moe_placement", cfg.dense_layer_indices, "no dense layers")
        if cfg.tie_word_embeddings:
            raise refuse_export(self.model_type, "tie_word_embeddings", True, "transformers' DBRX refuses it")
        rope = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type} | {
            k: v for k, v in (cfg.rope_scaling or {}).items() if k not in ("rope_type", "type")
        }
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            "d_model": cfg.dim,
            "n_heads": cfg.num_heads,
            "n_layers": cfg.num_layers,
            "max_seq_len": cfg.max_position_embeddings,
            "tie_word_embeddings": False,
            "initializer_range": cfg.initializer_range,
            "rope_parameters": rope,
            "attn_config": {
                "kv_n_heads": cfg.attn_num_kv_heads,
                "clip_qkv": cfg.clip_qkv,
                "rope_theta": cfg.rope_theta,
                "attn_pdrop": 0.0,
            },
            "ffn_config": {
                "ffn_act_fn": {"name": "silu"},
                "ffn_hidden_size": moe.ffn_dim,
                "moe_num_experts": moe.num_experts,
                "moe_top_k": moe.top_k,
                "moe_jitter_eps": moe.noise_eps if moe.noise == "jitter" else None,
                "moe_loss_weight": cfg.aux_loss_coef,
                "moe_normalize_expert_weights": 1.0 if moe.norm_topk_prob else None,
            },
            "use_cache": True,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Bias-free LayerNorms with MoE (or clipped qkv)."""
        return cfg.moe is not None and cfg.norm_type == "layernorm" and not cfg.norm_bias

    def targets(self, cfg: ModelConfig) -> list[Target]:
        """See the module docstring for the layout."""
        hd = cfg.attn_head_dim
        q_rows, kv_rows = cfg.num_heads * hd, cfg.attn_num_kv_heads * hd
        out = [Target.copy("embed_tokens.weight", "transformer.wte.weight")]
        for i in range(cfg.num_layers):
            src, dst = f"transformer.blocks.{i}.", f"layers.{i}."
            attn = f"{src}norm_attn_norm.attn."
            wqkv = f"{attn}Wqkv.weight"
            bounds = {
                "q": (0, q_rows),
                "k": (q_rows, q_rows + kv_rows),
                "v": (q_rows + kv_rows, q_rows + 2 * kv_rows),
            }
            out.append(Target.copy(f"{dst}input_layernorm.weight", f"{src}norm_attn_norm.norm_1.weight"))
            for p, (a, b) in bounds.items():
                out.append(Target(f"{dst}self_attn.{p}_proj.weight", [[Piece(wqkv, hf_rows=slice(a, b))]]))
            out.append(Target.copy(f"{dst}self_attn.o_proj.weight", f"{attn}out_proj.weight"))
            out.append(
                Target.copy(f"{dst}post_attention_layernorm.weight", f"{src}norm_attn_norm.norm_2.weight")
            )
            moe = cfg.moe_config(i)
            f = moe.ffn_dim
            mlp = f"{src}ffn.experts.mlp."
            out += [
                Target.copy(f"{dst}mlp.router.weight", f"{src}ffn.router.layer.weight"),
                Target(
                    f"{dst}mlp.experts.w_in",
                    [
                        [
                            Piece(f"{mlp}w1", (slice(None), slice(0, f)), flatten=True),
                            Piece(f"{mlp}v1", (slice(None), slice(f, 2 * f)), flatten=True),
                        ]
                    ],
                ),
                Target(f"{dst}mlp.experts.w_out", [[Piece(f"{mlp}w2", transpose=True, flatten=True)]]),
            ]
        out.append(Target.copy("norm.weight", "transformer.norm_f.weight"))
        out.append(Target.copy("lm_head.weight", "lm_head.weight"))
        return out
