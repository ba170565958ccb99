"""The family-support matrix (issue 17): every Hugging Face family moekit reads, run through every
tool's public function. Each (family, tool) cell either works, checked against a reference
(transformers' greedy tokens, the float model, the resident model, the parent model), or is a
pinned refusal: a one-line ``ValueError`` naming the family feature the tool does not handle.
Never another exception, never a silent wrong answer.

``benchmarks/support_matrix.py`` runs the same checks and prints docs/support-matrix.md.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import moekit  # noqa: E402
from moekit.layers import MoELayer  # noqa: E402

torch.set_num_threads(1)

TEXT = "def parse(text):\n    return [line.split() for line in text.splitlines()]\n\n" * 40
DENSE = ["llama", "mistral", "qwen2", "qwen3"]
BASE_MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
MORE_MOE = [
    "deepseek_v2",
    "glm4_moe",
    "granitemoe",
    "granitemoeshared",
    "ernie4_5_moe",
    "phimoe",
    "dbrx",
    "dots1",
    "hunyuan_v1_moe",
    "flex_olmo",
    "gpt_oss",
    "llama4_text",
    "jetmoe",
    "minimax",
]
FAMILIES = BASE_MOE + MORE_MOE + ["jamba"] + DENSE
TOOLS = ["import", "export", "generate", "serve", "offload", "quantize", "trace", "surgery", "gguf"]
NEW_TOKENS = 8

# (family, tool) -> a regex the one-line ValueError must match. Every other cell must work.
GROUPED_FAMILIES = ["deepseek_v3", "glm4_moe", "dots1"]
DENSE_REFUSALS = {"offload": "has no MoE layers", "trace": "has no MoE layers", "gguf": "dense models"}
NO_GGUF = "no llama.cpp family: .*"
REFUSALS: dict[tuple[str, str], str] = {
    **{(f, tool): why for f in DENSE for tool, why in DENSE_REFUSALS.items()},
    ("qwen2_moe", "gguf"): NO_GGUF + "dense layers between MoE layers",
    ("olmoe", "gguf"): NO_GGUF + "qk_norm='full'",
    ("deepseek_v3", "gguf"): NO_GGUF + "router topk/sigmoid, dense layers",
    ("deepseek_v2", "gguf"): NO_GGUF + "dense layers between MoE layers",
    ("glm4_moe", "gguf"): NO_GGUF + "router topk/sigmoid, dense layers",
    ("ernie4_5_moe", "gguf"): NO_GGUF + "dense layers between MoE layers",
    ("phimoe", "gguf"): NO_GGUF + "router sparsemixer",
    ("dots1", "gguf"): NO_GGUF + "router topk/sigmoid",
    ("hunyuan_v1_moe", "gguf"): NO_GGUF + "q/k norm after RoPE",
    ("flex_olmo", "gguf"): NO_GGUF + "norm_placement='post'",
    ("granitemoe", "gguf"): NO_GGUF + "embedding/residual/attention/logit multipliers",
    ("granitemoeshared", "gguf"): NO_GGUF + "multipliers, a shared expert without its sigmoid gate",
    ("dbrx", "gguf"): NO_GGUF + "clipped qkv, norm_type='layernorm'",
    ("jamba", "gguf"): NO_GGUF + "dense layers between MoE layers",
    # GPT-OSS: the expert store and quantized experts are two bias-free matrices per expert.
    ("gpt_oss", "offload"): r"^offload: MoE layer 0 has expert biases \(moe.ffn_bias=True\)",
    ("gpt_oss", "quantize"): r"^quantize: MoE layer 0 has expert biases \(moe.ffn_bias=True\)",
    ("gpt_oss", "gguf"): NO_GGUF + "activation swiglu_clamped.*expert biases, attention sinks",
    ("minimax", "gguf"): NO_GGUF + "norm_placement='normed_residual'",
    ("jetmoe", "gguf"): NO_GGUF + "attention_type='moa'",
    ("llama4_text", "gguf"): NO_GGUF
    + "router topk/sigmoid, dense layers.*routing weights on the expert input",
}


class FamilyCases:
    """Builds (once) each family's tiny random transformers model and its HF folder with a
    tokenizer.json; the vocabulary is the tokenizer's, so text round-trips through the server."""

    def __init__(self, root: Path) -> None:
        from moekit.data.tokenizer import train_tokenizer

        self.root = Path(root)
        self.tokenizer = train_tokenizer([TEXT], vocab_size=300)
        self.vocab = self.tokenizer.get_vocab_size()
        self._built: dict[str, tuple] = {}

    def _build(self, family: str) -> tuple:
        from moekit.data.tokenizer import save_tokenizer

        if family not in self._built:
            hf = self._make(family)
            folder = self.root / family / "hf"
            hf.save_pretrained(folder)
            save_tokenizer(self.tokenizer, folder)
            self._built[family] = (hf, folder)
        return self._built[family]

    def hf_model(self, family: str):
        """The transformers model (the reference)."""
        return self._build(family)[0]

    def folder(self, family: str) -> Path:
        """Its HF folder, with tokenizer.json."""
        return self._build(family)[1]

    def _make(self, family: str):
        from tests import test_convert, test_convert_families, test_jamba

        if family in GROUPED_FAMILIES:
            # 8 experts in 2 groups, so pruning can keep 3 of each (4 in 2 groups leaves no choice).
            key = "n_routed_experts"
            builder = test_convert if family == "deepseek_v3" else test_convert_families
            return builder.make_hf(family, vocab_size=self.vocab, **{key: 8})
        if family == "jamba":
            return test_jamba.make_hf(vocab_size=self.vocab)
        if family in MORE_MOE:
            return test_convert_families.make_hf(family, vocab_size=self.vocab)
        return test_convert.make_hf(family, vocab_size=self.vocab)

    def load(self, family: str):
        return moekit.from_pretrained(self.folder(family))

    def prompt(self, batch: int = 1) -> torch.Tensor:
        ids = self.tokenizer.encode(TEXT).ids
        return torch.tensor([ids[3 * b : 3 * b + 6] for b in range(batch)])


def hf_greedy(hf, prompt: torch.Tensor, n: int = NEW_TOKENS) -> torch.Tensor:
    hf.generation_config.eos_token_id = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _expert_bytes(model) -> int:
    return sum(
        p.numel() * p.element_size()
        for m in model.modules()
        if isinstance(m, MoELayer)
        for p in m.experts.parameters()
    )


def _is_moe(model) -> bool:
    return any(isinstance(m, MoELayer) for m in model.modules())


# ---- one check per tool: returns on success, raises ValueError on a refusal -------------------


def check_import(cases, family, tmp):
    hf, model = cases.hf_model(family), cases.load(family)
    ids = cases.prompt(2)
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-4, atol=1e-4)


def check_export(cases, family, tmp):
    model = cases.load(family)
    out = tmp / "export"
    model.save_pretrained(out, format="hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = cases.prompt(2)
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    assert (out / "generation_config.json").is_file()


def check_generate(cases, family, tmp):
    model, prompt = cases.load(family), cases.prompt()
    want = hf_greedy(cases.hf_model(family), prompt)
    assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS), want)


def check_serve(cases, family, tmp):
    from fastapi.testclient import TestClient

    from moekit.infer.server import ServerConfig, create_app
    from moekit.loader import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(cases.folder(family))
    model, tok, eos = loaded.model, loaded.tokenizer, loaded.eos_token_id
    prompt_text = "def parse("
    ids = torch.tensor([tok.encode_batch([prompt_text])[0].ids])
    direct = model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=eos)[0, ids.shape[1] :].tolist()
    if eos in direct:
        direct = direct[: direct.index(eos)]
    app = create_app(model, tok, ServerConfig(model_name="tiny"), eos_token_id=eos)
    with TestClient(app) as client:
        body = {"model": "tiny", "prompt": prompt_text, "max_tokens": NEW_TOKENS, "temperature": 0}
        resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == tok.decode(direct)


def check_offload(cases, family, tmp):
    from moekit.offload import offload_model

    model, prompt = cases.load(family), cases.prompt(2)
    want = model.generate(prompt, max_new_tokens=NEW_TOKENS)
    budget = _expert_bytes(model) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny model's budget may sit below its working set
        cache = offload_model(model, tmp / "store", cache_bytes=budget)
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert torch.equal(got, want)
    assert cache.stats.misses > 0


def check_quantize(cases, family, tmp):
    from moekit.compress import QuantConfig, quantize_model, save_quantized

    model, ids = cases.load(family), cases.prompt(2)
    ref = _logits(model, ids)
    # Experts (every non-expert linear too in a dense model), executed as the stored codes say:
    # fbgemm's 8-bit kernel also quantizes activations, and a post-norm family (flex_olmo)
    # rescales a tiny random FFN output, so its error says nothing about the codes.
    dense = not _is_moe(model)
    quantize_model(model, QuantConfig(bits=8, group_size=8, include_non_experts=dense, kernel="dequant"))
    assert all(
        type(m.experts).__name__ == "QuantizedExperts" for m in model.modules() if isinstance(m, MoELayer)
    )
    got = _logits(model, ids)
    assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max()) + 1e-3
    save_quantized(model, tmp / "q8")
    again = moekit.from_pretrained(tmp / "q8")
    torch.testing.assert_close(_logits(again, ids), got, rtol=1e-5, atol=1e-5)


def check_trace(cases, family, tmp):
    from moekit.analysis import record_trace

    model, ids = cases.load(family), cases.prompt(2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    trace = record_trace(model, [(ids, mask)])
    assert trace.num_tokens == int(mask.sum())
    moe_ids = [i for i in range(model.config.num_layers) if model.config.is_moe_layer(i)]
    assert trace.layer_indices == moe_ids and trace.num_layers == len(moe_ids) > 0
    for e_TK, num_e in zip(trace.expert_ids, trace.num_experts):
        assert e_TK.shape[0] == trace.num_tokens and int(e_TK.max()) < num_e


def check_surgery(cases, family, tmp):
    from moekit.surgery import PruneConfig, UpcycleConfig, prune_experts, upcycle

    model, ids = cases.load(family), cases.prompt(2)
    if _is_moe(model):
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        num_e, num_g = layers[0].config.num_experts, layers[0].config.num_expert_groups
        keep = num_e - num_g
        pruned = prune_experts(model, PruneConfig(num_keep=keep), calibration=[ids])
        assert all(m.experts.num_experts == keep for m in pruned.modules() if isinstance(m, MoELayer))
        for kept in pruned.pruned_experts:  # every group keeps the same number of its own experts
            assert (
                torch.bincount(torch.tensor(kept) // (num_e // num_g), minlength=num_g).tolist()
                == [keep // num_g] * num_g
            )
        assert torch.isfinite(_logits(pruned, ids)).all()
        pruned.generate(cases.prompt(), max_new_tokens=2)
    else:
        up = upcycle(model, UpcycleConfig(num_experts=4, top_k=2))
        assert _is_moe(up)
        torch.testing.assert_close(_logits(up, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def check_gguf(cases, family, tmp):
    import gguf

    from moekit.compress.gguf_export import export_gguf

    model = cases.load(family)
    path = export_gguf(
        model, tmp / "model.gguf", "f32", tokenizer_path=cases.folder(family) / "tokenizer.json"
    )
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) > 0


CHECKS = {name: globals()[f"check_{name}"] for name in TOOLS}


def run_cell(cases: FamilyCases, family: str, tool: str, tmp: Path) -> str | None:
    """Runs one cell; returns None on success or the refusal message."""
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        CHECKS[tool](cases, family, tmp)
    except ValueError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return FamilyCases(tmp_path_factory.mktemp("matrix"))


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cell(cases, family, tool, tmp_path):
    refusal = run_cell(cases, family, tool, tmp_path)
    expected = REFUSALS.get((family, tool))
    if expected is None:
        assert refusal is None, f"{family}/{tool} refused: {refusal}"
    else:
        assert refusal is not None, f"{family}/{tool} now works: drop it from REFUSALS"
        assert "\n" not in refusal
        assert re.search(expected, refusal), refusal


def test_matrix_covers_every_registered_hf_family():
    from moekit.convert.families import FAMILIES as REGISTERED

    names = set(REGISTERED)
    assert names == set(FAMILIES), json.dumps(sorted(names ^ set(FAMILIES)))


def test_int8_kernel_is_never_chosen_for_groups_it_would_crash_on():
    from moekit.compress import PackedLinear, choose_kernel, quantize_rtn

    # torch's _weight_int8pack_mm segfaults on an inner width that is not a multiple of 16.
    assert choose_kernel(8, 8, "exact") == "dequant"
    with pytest.raises(ValueError, match="multiple of 16"):
        choose_kernel(8, 24, "int8group")
    w = torch.randn(24, 48)
    layer = PackedLinear(quantize_rtn(w, 8, 8), kernel="exact")
    x = torch.randn(3, 48)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T)


def test_quantizing_jambas_narrow_dt_proj_is_refused_by_name(cases):
    from moekit.compress import QuantConfig, quantize_model

    model, ids = cases.load("jamba"), cases.prompt(2)
    before = _logits(model, ids)
    with pytest.raises(ValueError, match=r"dt_proj has 2 input columns, not a multiple of 8") as err:
        quantize_model(model, QuantConfig(bits=8, group_size=8, include_non_experts=True))
    assert "\n" not in str(err.value)
    # Refused before anything was replaced.
    assert not any(
        type(m.experts).__name__ == "QuantizedExperts" for m in model.modules() if isinstance(m, MoELayer)
    )
    assert torch.equal(_logits(model, ids), before)


def test_grouped_pruning_keeps_groups_whole():
    from moekit.surgery import PruneConfig
    from moekit.surgery.prune import choose_survivors

    usage = [torch.tensor([9.0, 8.0, 7.0, 6.0, 0.0, 1.0, 2.0, 3.0])]
    # The global top 4 would all come from group 0 and re-group experts 0-1 / 2-3.
    kept = choose_survivors(usage, [8], PruneConfig(num_keep=4), num_groups=[2])
    assert kept[0].tolist() == [0, 1, 6, 7]
    assert choose_survivors(usage, [8], PruneConfig(num_keep=4))[0].tolist() == [0, 1, 2, 3]


def test_grouped_pruning_refuses_uneven_groups(cases):
    from moekit.surgery import PruneConfig, prune_experts

    model = cases.load("glm4_moe")
    with pytest.raises(ValueError, match="num_keep=5 is not a multiple of layer 1's num_expert_groups=2"):
        prune_experts(model, PruneConfig(num_keep=5, metric="random"))


@pytest.mark.parametrize(
    "family, overrides, feature",
    [
        ("deepseek_v2", dict(first_k_dense_replace=0), "attention_type='mla'"),  # was a KeyError (no q_proj)
        ("granitemoe", {}, "multipliers"),  # was written as plain llama, the multipliers dropped
    ],
)
def test_gguf_names_the_family_feature_it_cannot_write(family, overrides, feature, tmp_path):
    from moekit.compress.gguf_export import export_gguf
    from moekit.convert import from_pretrained
    from tests import test_convert_families

    test_convert_families.make_hf(family, **overrides).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=re.escape(feature)) as err:
        export_gguf(from_pretrained(tmp_path / "hf"), tmp_path / "m.gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "m.gguf").exists()
