"""Vision Mamba: the bidirectional mixer against the MambaMixer run both ways by hand (float64),
and the ViT's ``mixer="bimamba"`` option."""

import pytest
import torch

from moekit.blocks import BidirectionalMamba, MambaConfig, MambaMixer
from moekit.convert.families.clip import _encoder_to_hf
from moekit.models.vision import ViTConfig, ViTMoE
from moekit.models.vision.presets import vision_preset


def _mixer(dt_bc_norm: bool = False) -> BidirectionalMamba:
    torch.manual_seed(0)
    cfg = MambaConfig(dim=6, expand=2, state_dim=3, conv_kernel=3, dt_bc_norm=dt_bc_norm, chunk_size=4)
    m = BidirectionalMamba(cfg).double()
    with torch.no_grad():  # distinct weights in the two directions, so a swap would show
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("dt_bc_norm", [False, True])
def test_bidirectional_equals_forward_plus_flipped_backward_by_hand(dt_bc_norm):
    m = _mixer(dt_bc_norm)
    x = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    got = m(x)  # the chunked scan (S > 1)
    # By hand, with the reference loop: the forward mixer on x, the backward mixer on x reversed.
    ahead = m.forward_mixer(x, scan="sequential")
    back = m.backward_mixer(x.flip(1), scan="sequential").flip(1)
    want = 0.5 * (ahead + back)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(got)
    g_got = torch.autograd.grad((got * w).sum(), [x, *m.parameters()])
    g_want = torch.autograd.grad((want * w).sum(), [x, *m.parameters()])
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Both directions matter: the first token's output depends on the last token.
    (g_first,) = torch.autograd.grad(m(x)[:, 0].sum(), x)
    assert g_first[:, -1].abs().sum() > 0


def test_padding_leaves_real_tokens_as_alone():
    m = _mixer()
    x = torch.randn(1, 7, 6, dtype=torch.float64)
    padded = torch.cat([x, torch.randn(1, 3, 6, dtype=torch.float64)], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    torch.testing.assert_close(m(padded, mask)[:, :7], m(x), rtol=1e-12, atol=1e-12)


def test_vit_bimamba_option():
    cfg = vision_preset("vit-digits-mamba")
    assert cfg.mixer == "bimamba" and ViTConfig.from_json(cfg.to_json()) == cfg
    model = ViTMoE(cfg)
    layer = model.encoder.layers[0]
    assert isinstance(layer.mamba, BidirectionalMamba) and not hasattr(layer, "self_attn")
    assert all(isinstance(layer.token_mixer.forward_mixer, MambaMixer) for layer in model.encoder.layers)
    # The shared init keeps Mamba's own A_log (log 1..N) and a positive dt bias.
    fm = layer.mamba.forward_mixer
    torch.testing.assert_close(fm.A_log[0], torch.log(torch.arange(1.0, 9.0)))
    assert torch.nn.functional.softplus(fm.dt_proj.bias).max() <= 0.1 + 1e-6
    groups = model.parameter_groups()
    assert "encoder.layers.0.mamba.backward_mixer.A_log" in groups["attention"]
    # The CLS token (position 0) depends on the last patch: the backward scan ran (a forward
    # scan alone would give exactly zero gradient).
    x = torch.randn(2, cfg.num_patches + 1, cfg.dim, requires_grad=True)
    (g,) = torch.autograd.grad(model.encoder(x).hidden[:, 0].sum(), x)
    assert g[:, -1].abs().sum() > 0


def test_vit_bimamba_save_load(tmp_path):
    model = ViTMoE(vision_preset("vit-digits-mamba-dense")).eval()
    model.save_pretrained(tmp_path / "m")
    again = ViTMoE.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)


def test_bad_configs_raise():
    base = dict(dim=8, num_layers=1, num_heads=2, ffn_dim=8, num_classes=2)
    with pytest.raises(ValueError, match="mixer"):
        ViTConfig(**base, mixer="conv")
    with pytest.raises(ValueError, match="mamba is given exactly when"):
        ViTConfig(**base, mixer="bimamba")
    with pytest.raises(ValueError, match="mamba.dim=6 must equal dim=8"):
        ViTConfig(**base, mixer="bimamba", mamba=MambaConfig(dim=6))
    cfg = ViTConfig(**base, mixer="bimamba", mamba=MambaConfig(dim=8))
    with pytest.raises(ValueError, match="cannot run causally"):
        ViTMoE(cfg).encoder(torch.randn(1, 3, 8), causal=True)
    with pytest.raises(ValueError, match="attention only"):
        _encoder_to_hf(cfg, "CLIPConfig.vision")
