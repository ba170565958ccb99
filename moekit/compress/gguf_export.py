"""Export a moekit model to a GGUF file for llama.cpp (f32, f16, q8_0, q4_0), with its BPE tokenizer.

Families (chosen from the config):
    ``qwen3moe``  per-head q/k RMSNorm (the moekit default presets).
    ``qwen2moe``  attention biases and/or a shared expert (Qwen2-MoE / Qwen1.5-MoE).
    ``llama``     plain attention with experts (Mixtral). llama.cpp applies RoPE to interleaved
                  pairs for this architecture, so q/k rows are permuted as in llama.cpp's
                  ``convert_hf_to_gguf.py`` (moekit, like HF, rotates halves).

Tensor names follow ``gguf.constants.TENSOR_NAMES`` (``blk.{i}.ffn_gate_exps`` ``[E, F, D]`` in
torch order, ...). Norms and routers stay float32; other matrices take the requested type.
A quantized moekit model is dequantized first (GGUF's own formats are written from floats).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from moekit.compress.experts import QuantizedExperts
from moekit.compress.kernels import PackedLinear

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


def _require_gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("GGUF export needs the `gguf` package: pip install 'moekit[compress]'") from err
    return gguf


def gguf_arch(config) -> str:
    """The llama.cpp architecture a :class:`ModelConfig` maps onto; ValueError if none does."""
    moe = config.moe
    if moe is None:
        raise ValueError("GGUF export: dense models are not handled here (no MoE layers)")
    unsupported = []
    if moe.num_zero_experts or moe.num_copy_experts or moe.num_constant_experts:
        unsupported.append("MoE++ zero-computation experts")
    if moe.residual_moe:
        unsupported.append("PR-MoE residual branch")
    if moe.score_func != "softmax" or moe.router_type != "topk" or moe.gating_residual:
        unsupported.append(f"router {moe.router_type}/{moe.score_func}")
    if config.moe_placement != "all" or config.num_dense_first_layers:
        unsupported.append("dense layers between MoE layers")
    if moe.activation != "swiglu":
        unsupported.append(f"activation {moe.activation}")
    if config.rope_scaling is not None:
        unsupported.append("rope_scaling")
    unsupported += _family_features(config)
    if config.qk_norm == "per_head" and not moe.shared_ffn_dim and not config.attention_bias:
        arch = "qwen3moe"
        if not moe.norm_topk_prob:
            unsupported.append("qwen3moe without norm_topk_prob")
    elif config.qk_norm == "none" and (moe.shared_ffn_dim or config.attention_bias):
        arch = "qwen2moe"
    elif config.qk_norm == "none":
        arch = "llama"
    else:
        arch = ""
        unsupported.append(f"qk_norm={config.qk_norm!r} with this layout")
    if unsupported:
        raise ValueError(f"GGUF export: this model has no llama.cpp family: {', '.join(unsupported)}")
    return arch


def float_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's float32 state dict, with quantized parts dequantized back to moekit's names."""
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            w_in, w_out = zip(*(module.expert_tensors(e) for e in range(module.num_experts)))
            state[f"{name}.w_in"] = torch.stack(w_in)
            state[f"{name}.w_out"] = torch.stack(w_out)
        elif isinstance(module, PackedLinear):
            state[f"{name}.weight"] = module.dequantized_weight()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.float()
    prefixes = [n for n, m in model.named_modules() if isinstance(m, (QuantizedExperts, PackedLinear))]
    return {
        k: v.detach().float().cpu()
        for k, v in state.items()
        if not any(
            k.startswith(p + ".") and k.split(".")[-1] in ("scale", "k_scale_zero", "k_scale", "k_zero_scale")
            for p in prefixes
        )
    }


def _permute_rope(w: Tensor, num_heads: int) -> Tensor:
    """Rotate-half rows -> interleaved pairs, per head (llama.cpp's ``LlamaModel.permute``)."""
    out_rows = w.shape[0]
    return w.reshape(num_heads, 2, out_rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer, tokenizer_path: Path, vocab_size: int, gguf) -> None:
    import json

    data = json.loads(tokenizer_path.read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(
            f"{tokenizer_path}: GGUF export handles byte-level BPE tokenizers, got {model.get('type')}"
        )
    vocab = dict(model["vocab"])
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(added)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"{tokenizer_path}: token ids reach {max(vocab.values())}, the model has {vocab_size} rows"
        )
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in added else gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer: llama.cpp needs one token per row
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eos = added.get("<|endoftext|>", min(added.values()) if added else 0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    if "<|pad|>" in added:
        writer.add_pad_token_id(added["<|pad|>"])
    writer.add_add_bos_token(False)


def _family_features(config) -> list[str]:
    """Features of imported families (ModelConfig fields past the plain layout, MoE options) that
    the three llama.cpp architectures written here do not compute; each is named in the refusal."""
    moe = config.moe
    found = []
    checks = [
        (config.attention_type != "mha", f"attention_type={config.attention_type!r}"),
        (config.sliding_window is not None, "sliding-window attention"),
        (config.partial_rotary_factor != 1.0, "partial RoPE"),
        (config.rope_interleave, "interleaved RoPE"),
        (not config.use_rope, "attention without RoPE"),
        (config.qk_norm_after_rope, "q/k norm after RoPE"),
        (config.clip_qkv is not None, "clipped qkv"),
        (
            config.embedding_multiplier != 1.0
            or config.residual_multiplier != 1.0
            or config.attention_multiplier is not None
            or config.logits_scaling != 1.0,
            "embedding/residual/attention/logit multipliers",
        ),
        (config.norm_type != "rmsnorm" or config.norm_bias, f"norm_type={config.norm_type!r} / norm bias"),
        (config.norm_placement != "pre", f"norm_placement={config.norm_placement!r}"),
        (config.attention_out_bias or config.lm_head_bias, "output-projection or lm_head bias"),
        (
            config.mamba is not None or any(t != "attention" for t in config.layer_types or ()),
            "Mamba layers",
        ),
        (len(set(config.experts_per_layer or ())) > 1, "a different expert count per layer"),
        (moe.routed_scaling_factor != 1.0, "routed_scaling_factor"),
        (moe.num_expert_groups > 1, "group-limited routing"),
        (moe.use_expert_bias or moe.router_bias, "router or expert-selection bias"),
        (moe.capacity_factor is not None, "token dropping (capacity_factor)"),
        (moe.ffn_bias, "expert biases"),
        (moe.weights_on_input, "routing weights on the expert input"),
        (bool(config.nope_layer_indices), "NoPE layers"),
        (config.attention_temperature_scale is not None, "attention temperature tuning"),
        (config.attention_sinks, "attention sinks"),
        (config.attention_layer_types is not None, "per-layer attention masks (attention_layer_types)"),
        (moe.shared_ffn_dim and not moe.shared_expert_gate, "a shared expert without its sigmoid gate"),
        (
            config.qk_norm == "none"
            and not (moe.shared_ffn_dim or config.attention_bias)
            and not (moe.norm_topk_prob or moe.softmax_order == "after_topk"),
            "llama MoE without renormalised top-k weights",
        ),
    ]
    for hit, name in checks:
        if hit:
            found.append(name)
    return found


def export_gguf(
    model: nn.Module, path: str | Path, out_type: str = "f16", tokenizer_path: str | Path | None = None
) -> Path:
    """Writes ``model`` as a GGUF file.

    Args:
        model: a ``MoEForCausalLM`` (float or quantized by moekit).
        path: output file.
        out_type: ``"f32"``, ``"f16"``, ``"q8_0"`` or ``"q4_0"`` for the matrices (norms and routers
            stay f32; q8_0/q4_0 need the input width of every matrix to be a multiple of 32).
        tokenizer_path: a Hugging Face ``tokenizer.json`` to embed (needed to run in llama.cpp).

    Returns:
        The path written.
    """
    if getattr(model.config, "pregated", False):
        raise ValueError(
            "export_gguf: a pregated model (ModelConfig.pregated) routes from the previous layer's input, "
            "which llama.cpp cannot run"
        )
    gguf = _require_gguf()
    if out_type not in GGUF_TYPES:
        raise ValueError(f"export_gguf: out_type={out_type!r} is not valid; choose one of {list(GGUF_TYPES)}")
    cfg = model.config
    arch = gguf_arch(cfg)
    moe = cfg.moe
    head_dim = cfg.head_dim or cfg.dim // cfg.num_heads
    num_kv = cfg.num_kv_heads or cfg.num_heads
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[out_type]
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[out_type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("moekit")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.ffn_dim or moe.ffn_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(num_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(moe.num_experts)
    writer.add_expert_used_count(moe.top_k)
    writer.add_expert_feed_forward_length(moe.ffn_dim)
    if arch == "qwen2moe" and moe.shared_ffn_dim:
        writer.add_expert_shared_feed_forward_length(moe.shared_ffn_dim)
    writer.add_file_type(ftype)
    if tokenizer_path is not None:
        _add_tokenizer(writer, Path(tokenizer_path), cfg.vocab_size, gguf)

    def put(name: str, t: Tensor, keep_f32: bool = False) -> None:
        arr = t.detach().float().contiguous().numpy().astype(np.float32)
        if keep_f32 or arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, arr)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, arr.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    sd = float_state_dict(model)
    put("token_embd.weight", sd["embed_tokens.weight"])
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _permute_rope(q, cfg.num_heads), _permute_rope(k, num_kv)
        put(b + "attn_q.weight", q)
        put(b + "attn_k.weight", k)
        put(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        if cfg.attention_bias:
            for proj, short in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")):
                put(f"{b}{short}.bias", sd[f"{p}self_attn.{proj}_proj.bias"])
        if arch == "qwen3moe":
            put(b + "attn_q_norm.weight", sd[p + "self_attn.q_norm.weight"])
            put(b + "attn_k_norm.weight", sd[p + "self_attn.k_norm.weight"])
        put(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(b + "ffn_gate_inp.weight", sd[p + "mlp.router.weight"], keep_f32=True)
        w_in, w_out = sd[p + "mlp.experts.w_in"], sd[p + "mlp.experts.w_out"]
        f = moe.ffn_dim
        put(b + "ffn_gate_exps.weight", w_in[:, :f])
        put(b + "ffn_up_exps.weight", w_in[:, f:])
        put(b + "ffn_down_exps.weight", w_out)
        if arch == "qwen2moe" and moe.shared_ffn_dim:
            s_in, s_out = sd[p + "mlp.shared.w_in.weight"], sd[p + "mlp.shared.w_out.weight"]
            fs = moe.shared_ffn_dim
            put(b + "ffn_gate_shexp.weight", s_in[:fs])
            put(b + "ffn_up_shexp.weight", s_in[fs:])
            put(b + "ffn_down_shexp.weight", s_out)
            if moe.shared_expert_gate:
                put(
                    b + "ffn_gate_inp_shexp.weight",
                    sd[p + "mlp.shared_gate.weight"].reshape(-1),
                    keep_f32=True,
                )
    put("output_norm.weight", sd["norm.weight"])
    put("output.weight", sd["lm_head.weight"] if "lm_head.weight" in sd else sd["embed_tokens.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
