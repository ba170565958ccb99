"""moekit.compress: quantization bounds, GPTQ, MILP optimality, checkpoints, kernels, pruning, GGUF.

Tiny models only (moe-tiny: dim 64, 2 layers, 4 experts), single-threaded; < 90 s on 2 cores.
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from moekit.compress import (
    MixedPrecisionConfig,
    PackedLinear,
    PruneConfig,
    QuantConfig,
    QuantizedExperts,
    allocate_bits,
    brute_force_allocation,
    collect_layer_inputs,
    dynamic_prune,
    expert_calls_saved,
    expert_stats,
    is_quantized_folder,
    load_quantized,
    quantize_experts,
    quantize_model,
    quantize_rtn,
    save_quantized,
    solve_allocation,
)
from moekit.compress.quant import effective_bits, pack_codes, unpack_codes
from moekit.kernels import qlinear
from moekit.layers.experts import activate
from moekit.models import MoEForCausalLM, get_preset


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny(seed: int = 0) -> MoEForCausalLM:
    torch.manual_seed(seed)
    return MoEForCausalLM(get_preset("moe-tiny")).eval()


def _batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (2, 48), generator=g) for _ in range(n)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_rtn_error_within_half_scale_and_packing_round_trips(bits):
    torch.manual_seed(bits)
    w = torch.randn(24, 256) * torch.rand(24, 1)
    qt = quantize_rtn(w, bits, 64)
    assert qt.packed.dtype == torch.uint8 and qt.packed.shape == (24, 256 * bits // 8)
    codes = qt.codes()
    assert int(codes.max()) <= 2**bits - 1
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 256), codes)
    err_RG = (w - qt.dequantize()).abs().view(24, 4, 64).amax(-1)
    assert (err_RG <= qt.scale.float() / 2 * (1 + 1e-5) + 1e-7).all()
    # more bits, less error
    if bits < 8:
        finer = quantize_rtn(w, 8, 64)
        assert (w - finer.dequantize()).norm() < (w - qt.dequantize()).norm()


def test_unsupported_bits_and_methods_name_the_choices():
    with pytest.raises(ValueError, match=r"bits=5.*\[1, 2, 3, 4, 8\]"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match=r"method='awq'.*\['rtn', 'gptq'\]"):
        QuantConfig(method="awq")
    with pytest.raises(ValueError, match=r"bits=0"):  # 1 bit is a width since MC-MoE's {1, 2, 3}
        quantize_rtn(torch.randn(4, 64), 0, 64)
    with pytest.raises(ValueError, match="candidate_bits"):
        MixedPrecisionConfig(candidate_bits=(2, 6))
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        quantize_rtn(torch.randn(4, 64), 4, 48)
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(_tiny(), QuantConfig(method="gptq", group_size=64))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_kernels_match_dequantized_fp32(bits):
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    x = torch.randn(7, 128)
    bias = torch.randn(96)
    exact = PackedLinear(quantize_rtn(w, bits, 64), bias=bias, kernel="exact")
    assert exact.kernel == ("int4x2" if bits == 8 else "int4pack")
    ref = x @ exact.dequantized_weight().t() + bias
    deq = PackedLinear(quantize_rtn(w, bits, 64), bias=bias, kernel="dequant")
    torch.testing.assert_close(deq(x), ref, rtol=1e-5, atol=1e-5)
    # bfloat16 activations in the kernels: about 3 significant digits
    err = (exact(x) - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, float(err)
    assert exact(x.bfloat16()).dtype == torch.bfloat16
    auto = PackedLinear(quantize_rtn(w, bits, 64), bias=bias)
    if bits == 8:
        loop = PackedLinear(quantize_rtn(w, bits, 64), bias=bias, kernel="int8group")
        assert (loop(x) - ref).abs().max() / ref.abs().max() < 2e-2
        # fbgemm re-quantizes per channel and quantizes activations: an approximation
        fb = PackedLinear(quantize_rtn(w, bits, 64), bias=bias, kernel="fbgemm")
        assert (fb(x) - ref).abs().max() / ref.abs().max() < 5e-2
    # auto: moekit's native kernel where it builds (block-32 int8 activations, tests in
    # test_kernels_quant.py), else int4pack / fbgemm
    if qlinear.native_available():
        assert auto.kernel == "native"
    else:
        assert auto.kernel == ("fbgemm" if bits == 8 else "int4pack")
    assert (auto(x) - ref).abs().max() / ref.abs().max() < 5e-2
    with pytest.raises(ValueError, match="does not run"):
        PackedLinear(quantize_rtn(w, bits, 64), kernel="int4x2" if bits < 8 else "int4pack")


@torch.no_grad()
def _expert_output_error(layer, experts, inputs) -> float:
    total = 0.0
    for e in range(layer.config.num_experts):
        x_ND, _ = inputs.routed(e)
        w_in, w_out = layer.experts.expert_tensors(e)
        ref = activate(x_ND @ w_in.t(), "swiglu") @ w_out.t()
        total += float(((experts.expert_forward(e, x_ND) - ref) ** 2).sum())
    return total


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_lowers_output_error_vs_rtn_on_calibration_data(bits):
    model = _tiny()
    layer = model.moe_layers[0]
    inputs = collect_layer_inputs(model, _batches(4), [0])[0]
    cfg = QuantConfig(bits=bits, method="gptq", group_size=64, kernel="dequant")
    rtn = quantize_experts(layer, [bits] * 4, cfg.replace(method="rtn"))
    gptq = quantize_experts(layer, [bits] * 4, cfg, inputs)
    e_rtn = _expert_output_error(layer, rtn, inputs)
    e_gptq = _expert_output_error(layer, gptq, inputs)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def test_milp_respects_budget_and_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    candidates = [2, 3, 4, 8]
    num_l, num_e = 2, 3
    params = [[int(p) for p in torch.randint(1000, 5000, (num_e,), generator=g)] for _ in range(num_l)]
    # error falls with bits, at expert-specific rates
    costs = [
        [[float(torch.rand(1, generator=g)) * 4.0 ** (-b) for b in candidates] for _ in range(num_e)]
        for _ in range(num_l)
    ]
    for avg in (2.3, 2.9, 3.4, 4.6, 6.0):
        milp = solve_allocation(costs, params, candidates, avg, 128)
        brute = brute_force_allocation(costs, params, candidates, avg, 128)
        assert milp.avg_bits <= avg + 1e-9
        assert milp.cost == pytest.approx(brute.cost, rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_allocation(costs, params, candidates, 2.0, 128)
    assert len(list(itertools.product(candidates, repeat=num_l * num_e))) == 4096


def test_mixed_precision_end_to_end_respects_budget_and_beats_uniform():
    model = _tiny()
    # The earlier moekit settings (one global budget, no minimum use, the expert's own MSE).
    mcfg = MixedPrecisionConfig(
        avg_bits=3.0,
        candidate_bits=(2, 3, 4),
        group_size=64,
        per_layer_budget=False,
        min_bits_each=False,
        objective="expert_mse",
        beta=1.0,
    )
    stats = expert_stats(model, _batches(2), mcfg.candidate_bits, mcfg.group_size)
    assert len(stats.error) == 2 and len(stats.error[0]) == 4 and len(stats.error[0][0]) == 3
    assert all(abs(sum(f) - 1) < 1e-5 for f in stats.freq)
    alloc = allocate_bits(stats, mcfg)
    assert alloc.avg_bits <= 3.0 + 1e-9
    # uniform 2 bits is the best uniform choice under this budget (3 + 24/64 > 3)
    from moekit.compress import uniform_allocation

    assert alloc.cost <= uniform_allocation(stats, 2, 64).cost
    q = quantize_model(copy.deepcopy(model), QuantConfig(group_size=64, expert_bits=alloc.bits))
    assert [layer.experts.bits for layer in q.moe_layers] == alloc.bits
    assert effective_bits(2, 64) == pytest.approx(2.375)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_checkpoint_round_trips(tmp_path, method):
    model = _tiny()
    cfg = QuantConfig(bits=4, method=method, group_size=64, include_non_experts=True, non_expert_bits=8)
    q = quantize_model(model, cfg, _batches(2))
    assert isinstance(q.moe_layers[0].experts, QuantizedExperts)
    assert isinstance(q.lm_head, PackedLinear) and isinstance(q.layers[0].self_attn.q_proj, PackedLinear)
    ids = torch.randint(0, 512, (2, 16))
    before = q(ids).logits
    save_quantized(q, tmp_path / "q")
    assert is_quantized_folder(tmp_path / "q")
    cfg_json = json.loads((tmp_path / "q" / "config.json").read_text())
    assert (
        cfg_json["quantization"]["method"] == method
        and cfg_json["quantization"]["expert_bits"] == [[4] * 4] * 2
    )
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("layers.0.mlp.experts.w_in.0.qweight").dtype == torch.uint8
    assert "layers.0.mlp.experts.w_in" not in keys and "lm_head.qweight" in keys
    loaded = load_quantized(tmp_path / "q")
    torch.testing.assert_close(loaded(ids).logits, before, rtol=0, atol=0)
    # the quantized model stays close to the float one
    ref = _tiny()(ids).logits
    assert (before - ref).abs().max() < 0.2 * ref.abs().max()
    bf16 = load_quantized(tmp_path / "q", dtype=torch.bfloat16)
    assert bf16(ids).logits.dtype == torch.bfloat16


def test_dynamic_pruning_noop_at_zero_and_saves_calls():
    model = _tiny()
    keys = set(model.state_dict())
    ids = torch.randint(0, 512, (2, 32))
    ref = model(ids)
    dynamic_prune(model, PruneConfig(threshold=0.0))
    out = model(ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    assert expert_calls_saved(out.routing) == 0.0
    dynamic_prune(model, PruneConfig(threshold=1.0))
    out = model(ids)
    saved = expert_calls_saved(out.routing)
    assert 0.3 < saved <= 0.5  # top-2: at most the second slot of every token
    assert set(model.state_dict()) == keys
    for r in out.routing:
        assert ((r.expert_ids >= 0).sum(-1) >= 1).all()
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(r.weights.shape[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="threshold"):
        PruneConfig(threshold=1.5)


def test_offload_low_bit_fallback_runs_on_misses(tmp_path):
    from moekit.offload import offload_model

    model = _tiny()
    ids = torch.randint(0, 512, (1, 12))
    low = quantize_model(copy.deepcopy(model), QuantConfig(bits=4, group_size=64))
    fallback = [layer.experts for layer in low.moe_layers]
    one_expert = 128 * 64 * 4 + 64 * 64 * 4
    with pytest.warns(UserWarning, match="working set"):  # the fallback covers the misses
        cache = offload_model(model, tmp_path / "store", cache_bytes=2 * one_expert, fallback=fallback)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    cache.close()
    assert out.shape == (1, 16)
    assert cache.stats.fallbacks > 0
    assert cache.stats.as_dict()["fallbacks"] == cache.stats.fallbacks


def _export_and_read(model, path, out_type):
    gguf = pytest.importorskip("gguf", reason="GGUF export needs the `gguf` package (extra: compress)")
    from moekit.compress.gguf_export import export_gguf

    export_gguf(model, path, out_type)
    return gguf, gguf.GGUFReader(str(path))


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_written_and_readable(tmp_path, out_type):
    model = _tiny()
    gguf, reader = _export_and_read(model, tmp_path / f"m-{out_type}.gguf", out_type)
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config
    want = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[out_type]
    assert len(tensors) == 3 + cfg.num_layers * 12
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type.name == want
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
    # GGUF lists dims innermost first: [D, F, E] for a torch [E, F, D]
    assert [int(d) for d in tensors["blk.0.ffn_gate_exps.weight"].shape] == [64, 64, 4]
    assert [int(d) for d in tensors["blk.0.ffn_down_exps.weight"].shape] == [64, 64, 4]
    assert [int(d) for d in tensors["output.weight"].shape] == [64, 512]
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen3moe"
    count = reader.fields["qwen3moe.expert_count"]
    assert int(count.parts[count.data[0]][0]) == 4
    if out_type == "f32":
        got = torch.from_numpy(tensors["blk.0.ffn_up_exps.weight"].data.copy())
        torch.testing.assert_close(got, model.layers[0].mlp.experts.w_in.detach()[:, 64:])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from moekit.train import train
    from tests.test_train import _config, _write_corpus

    tmp = tmp_path_factory.mktemp("compress-cli")
    corpus = _write_corpus(tmp / "corpus")
    train(_config(tmp, corpus, max_steps=4), progress=False)
    return tmp / "run", corpus


def _verb(module, argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return module.run(p.parse_args(argv))


def test_cli_quantize_then_generate_eval_and_export(tiny_run, tmp_path, capsys):
    from moekit.cli import export_gguf, quantize
    from moekit.cli.main import main

    run_dir, corpus = tiny_run
    out = tmp_path / "q4"
    argv = [
        "--model",
        str(run_dir),
        "--bits",
        "4",
        "--method",
        "gptq",
        "--out",
        str(out),
        "--group-size",
        "32",
    ]
    assert (
        _verb(quantize, [*argv, "--include-non-experts", "--calib", str(corpus), "--calib-batches", "2"]) == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bytes_after"] < summary["bytes_before"] / 3
    assert is_quantized_folder(out) and (out / "tokenizer.json").is_file()
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--prompt",
                "for ",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("for ")
    assert main(["eval", "--model", str(out), "--seq-len", "16", "--batch-size", "2", "--batches", "2"]) == 0
    assert 1.0 < json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] < 600
    mixed = tmp_path / "mixed"
    margs = [
        "--model",
        str(run_dir),
        "--mixed",
        "--avg-bits",
        "3.5",
        "--candidate-bits",
        "2,4",
        "--out",
        str(mixed),
    ]
    assert (
        _verb(quantize, [*margs, "--group-size", "32", "--calib", str(corpus), "--calib-batches", "2"]) == 0
    )
    alloc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["allocation"]
    assert alloc["avg_bits"] <= 3.5 and {b for row in alloc["bits"] for b in row} <= {2, 4}
    with pytest.raises(ValueError, match=r"--bits=6.*\[1, 2, 3, 4, 8\]"):
        _verb(quantize, ["--model", str(run_dir), "--bits", "6", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match=r"--method='hqq'.*\['rtn', 'gptq'\]"):
        _verb(quantize, ["--model", str(run_dir), "--method", "hqq", "--out", str(tmp_path / "x")])
    pytest.importorskip("gguf", reason="GGUF export needs the `gguf` package (extra: compress)")
    import gguf

    assert (
        _verb(export_gguf, ["--model", str(run_dir), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0"])
        == 0
    )
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt2"
    from tests.test_train import VOCAB

    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB  # one token per embedding row


def test_llama_cpp_greedy_tokens_match_moekit_at_f32(tiny_run, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (its source build exceeded the time budget here)",
    )
    from moekit.cli.common import load_model_and_tokenizer
    from moekit.compress.gguf_export import export_gguf

    run_dir, _ = tiny_run
    model, tok, folder = load_model_and_tokenizer(run_dir)
    path = export_gguf(model, tmp_path / "m.gguf", "f32", folder / "tokenizer.json")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, n_threads=1)
    prompt = tok.encode("def f(x):").ids
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == 8:
            break
    assert theirs == ours


@pytest.mark.parametrize("prefetch", [None, "pregate"])
def test_offloaded_quantized_experts_stay_packed_and_match_resident(tmp_path, prefetch):
    from moekit.offload.quantized import QuantizedExpertStore, offload_quantized_model

    q = quantize_model(_tiny(), QuantConfig(bits=4, group_size=64))
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        want = q.generate(ids, max_new_tokens=5, do_sample=False)
        want_logits = q(ids).logits
    cache = offload_quantized_model(q, tmp_path / "qstore", cache_bytes=3 * 14_000, prefetch=prefetch)
    with torch.no_grad():
        got = q.generate(ids, max_new_tokens=5, do_sample=False)
        got_logits = q(ids).logits
    cache.close()
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0)
    store = QuantizedExpertStore(tmp_path / "qstore")
    float_bytes = (128 * 64 + 64 * 64) * 4
    assert store.expert_bytes(0, 0) < float_bytes / 6  # 4 bits + scales/zeros instead of 32
    assert cache.stats.misses > 0 and cache.stats.bytes_read % store.expert_bytes(0, 0) == 0


def test_a_quantized_store_of_other_codes_is_rebuilt(tmp_path):
    """Another quantization of the same model must not reuse the first one's packed store."""
    from moekit.offload.quantized import offload_quantized_model

    ids = torch.randint(0, 512, (1, 8))
    q4 = quantize_model(_tiny(), QuantConfig(bits=4, group_size=64))
    q8 = quantize_model(_tiny(), QuantConfig(bits=8, group_size=64))
    with torch.no_grad():
        want8 = q8(ids).logits
    offload_quantized_model(q4, tmp_path / "qstore", cache_bytes=3 * 14_000).close()
    with pytest.warns(UserWarning, match="other weights"):
        cache = offload_quantized_model(q8, tmp_path / "qstore", cache_bytes=3 * 30_000)
    with torch.no_grad():
        torch.testing.assert_close(q8(ids).logits, want8, rtol=0, atol=0)
    cache.close()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_kernel_form_alone_holds_the_codes_exactly(bits):
    torch.manual_seed(bits)
    for g in (32, 64, 128):
        w = torch.randn(80, 256) * 0.05 + 0.02 * torch.randn(80, 1)
        qt = quantize_rtn(w, bits, g)
        pl = PackedLinear(qt)
        assert pl.qweight is None  # the packed copy is dropped; state_dict recovers it
        assert torch.equal(pl.state_dict()["qweight"], qt.packed)
        assert torch.equal(pl.dequantized_weight(), qt.dequantize())
        other = PackedLinear(quantize_rtn(torch.randn(80, 256), bits, g))
        other.load_state_dict(pl.state_dict())
        x = torch.randn(3, 256)
        torch.testing.assert_close(other(x), pl(x), rtol=0, atol=0)


def test_gptq_on_all_linears_lowers_logit_error_vs_rtn():
    model = _tiny()
    calib = _batches(4)
    with torch.no_grad():
        ref = [model(b).logits for b in calib]
        errs = {}
        for method in ("rtn", "gptq"):
            cfg = QuantConfig(bits=3, method=method, group_size=64, include_non_experts=True)
            q = quantize_model(copy.deepcopy(model), cfg, calib)
            errs[method] = sum(float(((q(b).logits - r) ** 2).mean()) for b, r in zip(calib, ref))
    assert errs["gptq"] < 0.95 * errs["rtn"], errs
