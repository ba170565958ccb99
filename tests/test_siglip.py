"""SigLIP import: a tiny random transformers ``SiglipModel`` folder opens as a moekit dual encoder
whose ``logits_per_image`` match transformers' (float32 within 1e-5, float64 within 1e-12), with
padded text; the ``gelu_tanh`` expert activation against autograd; config errors."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.convert.families.siglip import load_siglip_hf
from moekit.layers import MoEConfig, MoELayer
from moekit.models.vision.siglip import SigLIPMoE

torch.set_num_threads(1)


def _hf_siglip(act: str = "gelu_pytorch_tanh"):
    transformers = pytest.importorskip("transformers")
    common = dict(num_attention_heads=2, layer_norm_eps=1e-6, hidden_act=act)
    text = transformers.SiglipTextConfig(
        vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2, max_position_embeddings=8,
        projection_size=16, **common,
    )  # fmt: skip
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=36, num_hidden_layers=3, image_size=12, patch_size=4, num_channels=3,
        **common,
    )  # fmt: skip
    cfg = transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    torch.manual_seed(0)
    model = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms, biases, scale and bias
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name in ("logit_scale", "logit_bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_hf_siglip_import_logits_match_transformers(tmp_path, act):
    hf = _hf_siglip(act)
    hf.save_pretrained(tmp_path / "hf")
    import moekit

    ours = moekit.from_pretrained(tmp_path / "hf")
    assert isinstance(ours, SigLIPMoE) and ours.config.vision.activation == (
        "gelu_tanh" if "tanh" in act else "gelu"
    )
    torch.manual_seed(1)
    px = torch.randn(3, 3, 12, 12)
    ids = torch.tensor([[1, 5, 9, 3, 0, 0, 0, 0], [4, 7, 0, 0, 0, 0, 0, 0], [1, 3, 4, 5, 6, 2, 8, 9]])
    mask = (torch.arange(8)[None] < torch.tensor([4, 2, 8])[:, None]).long()
    with torch.no_grad():
        for m in (hf, ours):
            m.float()
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image
        got = ours(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image
        assert got.shape == (3, 3) and (want - got).abs().max().item() < 1e-5
        want = hf.double()(input_ids=ids, pixel_values=px.double(), attention_mask=mask).logits_per_image
        got = ours.double()(input_ids=ids, pixel_values=px.double(), attention_mask=mask).logits_per_image
        assert (want - got).abs().max().item() < 1e-12


def test_siglip_config_errors_are_one_line(tmp_path):
    hf = _hf_siglip()
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "relu"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        load_siglip_hf(tmp_path / "hf")


def test_gelu_tanh_experts_sorted_path_matches_autograd_float64():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=8, ffn_dim=6, num_experts=3, top_k=2, activation="gelu_tanh")).double()
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.backend == "sorted"
    want = torch.zeros_like(x)
    for t in range(10):
        for k in range(2):
            e = int(out.routing.expert_ids[t, k])
            h = torch.nn.functional.gelu(layer.experts.w_in[e] @ x[t], approximate="tanh")
            want[t] = want[t] + out.routing.weights[t, k] * (layer.experts.w_out[e] @ h)
    torch.testing.assert_close(out.hidden, want, rtol=0, atol=1e-12)
    g = torch.randn_like(x)
    got = torch.autograd.grad(
        (out.hidden * g).sum(), [x, layer.experts.w_in, layer.experts.w_out], retain_graph=True
    )
    exp = torch.autograd.grad((want * g).sum(), [x, layer.experts.w_in, layer.experts.w_out])
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
