"""The Mamba mixer: its three scans against each other (float64, forward and gradients), the
decode state, padding, the config's validation, and transformers' Jamba mixer on the same weights."""

from __future__ import annotations

import pytest
import torch

from moekit.blocks import (
    KVCache,
    MambaConfig,
    MambaMixer,
    cumsum_chunks,
    scan_chunked,
    scan_method,
    scan_sequential,
    scan_step,
)


def _scan_inputs(b=2, s=37, i=6, n=4, seed=0, dtype=torch.float64, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, i, generator=g, dtype=dtype)
    # Time steps up to ~3 and A down to -8: decays as steep as exp(-24) per token, the regime
    # where a difference of running sums would lose precision.
    dt = torch.nn.functional.softplus(torch.randn(b, s, i, generator=g, dtype=dtype) * 2) * dt_scale
    A = -torch.exp(torch.randn(i, n, generator=g, dtype=dtype))
    A[0, 0] = -8.0
    B = torch.randn(b, s, n, generator=g, dtype=dtype)
    C = torch.randn(b, s, n, generator=g, dtype=dtype)
    h0 = torch.randn(b, i, n, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C, h0)]


@pytest.mark.parametrize("form", ["cumsum", "segsum"])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_chunked_scan_matches_sequential_forward_and_gradients(chunk_size, form):
    # The cumulative form is only taken where the decays fit its range; the segment sums take
    # the steep decays too.
    inputs = _scan_inputs(dt_scale=0.2 if form == "cumsum" else 1.0)
    if form == "cumsum":  # mild decays: the greedy chunks are the full ones
        assert max(cumsum_chunks(inputs[1], inputs[2], chunk_size)) == min(chunk_size, 37)
    y_ref, h_ref = scan_sequential(*inputs)
    y, h = scan_chunked(*inputs, chunk_size=chunk_size, form=form)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    w_y, w_h = torch.randn_like(y), torch.randn_like(h)
    grads_ref = torch.autograd.grad((y_ref * w_y).sum() + (h_ref * w_h).sum(), inputs)
    grads = torch.autograd.grad((y * w_y).sum() + (h * w_h).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_steep_decays_shorten_only_their_chunks():
    x, dt, A, B, C, h0 = (t.detach().float() for t in _scan_inputs(s=40, dt_scale=0.01))
    assert cumsum_chunks(dt, A, 16) == [16, 16, 8]
    steep = dt.clone()
    steep[:, 20] = 50.0  # one token far past float32's exp range on its own
    lengths = cumsum_chunks(steep, A, 16)
    assert sum(lengths) == 40 and 1 in lengths and lengths[0] == 16
    for dts in (steep, dt * 50.0):
        y_ref, h_ref = scan_sequential(x, dts, A, B, C, h0)
        y, h = scan_chunked(x, dts, A, B, C, h0, chunk_size=16)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="form"):
        scan_chunked(x, dt, A, B, C, form="fast")
    # Gradients stay finite at every steepness, where the chunk totals sit near the limit too.
    for scale in (0.05, 0.2, 1.0, 50.0):
        leaves = [t.clone().requires_grad_() for t in (x, dt * scale * 100, A, B, C, h0)]
        y, h = scan_chunked(*leaves, chunk_size=16)
        grads = torch.autograd.grad(y.sum() + h.sum(), leaves)
        assert all(torch.isfinite(g).all() for g in grads), scale


def test_step_matches_sequential():
    x, dt, A, B, C, h0 = (t.detach() for t in _scan_inputs(s=9))
    y_ref, h_ref = scan_sequential(x, dt, A, B, C, h0)
    h, ys = h0, []
    for t in range(x.shape[1]):
        y_t, h = scan_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)


def _mixer(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = MambaConfig(dim=8, state_dim=4, conv_kernel=3, expand=2, dt_bc_norm=True, chunk_size=4, **kw)
    mixer = MambaMixer(cfg, layer_idx=0).to(dtype)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms, A and D
    return mixer


def test_scan_method_dispatch():
    assert scan_method(1, True) == "step"
    assert scan_method(1, False) == "chunked"
    assert scan_method(7, True) == "chunked"
    assert scan_method(7, False, "sequential") == "sequential"
    with pytest.raises(ValueError, match="one token"):
        scan_method(3, True, "step")
    with pytest.raises(ValueError, match="scan"):
        scan_method(3, True, "fast")


@pytest.mark.parametrize("proj_bias", [False, True])
def test_mixer_scans_agree_forward_and_gradients(proj_bias):
    mixer = _mixer(proj_bias=proj_bias)
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    outs, grads = {}, {}
    for scan in ("sequential", "chunked"):
        out = mixer(x, scan=scan)
        outs[scan] = out
        grads[scan] = torch.autograd.grad(
            (out * torch.linspace(-1, 1, 8, dtype=out.dtype)).sum(), [x, *mixer.parameters()]
        )
    torch.testing.assert_close(outs["chunked"], outs["sequential"], rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads["chunked"], grads["sequential"], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def test_decode_with_cache_matches_full_forward():
    mixer = _mixer()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    full = mixer(x, scan="sequential")
    cache = KVCache(1)
    prefix = mixer(x[:, :4], cache=cache)  # chunked prefill
    steps = [mixer(x[:, t : t + 1], cache=cache) for t in range(4, 10)]  # auto: the step path
    torch.testing.assert_close(torch.cat([prefix, *steps], 1), full, rtol=1e-10, atol=1e-12)
    state = cache.mamba_state(0)
    assert cache.seq_len == 10
    assert state.conv_BIK.shape == (2, 16, 3) and state.ssm_BIN.shape == (2, 16, 4)
    with pytest.raises(ValueError, match="rolled back"):
        cache.crop(5)
    # A multi-token continuation (chunked prefill of a second part) agrees too.
    cache2 = KVCache(1)
    parts = [mixer(x[:, :3], cache=cache2), mixer(x[:, 3:8], cache=cache2), mixer(x[:, 8:], cache=cache2)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-12)


def test_left_padding_leaves_real_rows_unchanged():
    mixer = _mixer()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    alone = mixer(x)
    padded = torch.cat([torch.randn(1, 3, 8, dtype=torch.float64), x], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = mixer(padded, token_mask_BS=mask)
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-10, atol=1e-12)


def test_config_validation_and_round_trip():
    cfg = MambaConfig(dim=40, expand=3, state_dim=8, conv_kernel=2, dt_bc_norm=True)
    assert cfg.inner_dim == 120 and cfg.time_step_rank == 3
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="MambaConfig.state_dim"):
        MambaConfig(dim=8, state_dim=0)
    with pytest.raises(ValueError, match="MambaConfig.activation"):
        MambaConfig(dim=8, activation="tanh")
    with pytest.raises(ValueError, match="MambaConfig.dt_rank"):
        MambaConfig(dim=8, dt_rank=0)


@pytest.mark.parametrize(("d_state", "d_conv", "expand", "proj_bias"), [(4, 3, 2, False), (6, 2, 3, True)])
def test_matches_transformers_jamba_mixer(d_state, d_conv, expand, proj_bias):
    pytest.importorskip("transformers")
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    hf_cfg = JambaConfig(
        hidden_size=16,
        mamba_d_state=d_state,
        mamba_d_conv=d_conv,
        mamba_expand=expand,
        mamba_proj_bias=proj_bias,
        use_mamba_kernels=False,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(1)
    hf = JambaMambaMixer(hf_cfg, layer_idx=0).double()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        hf.A_log.copy_(torch.randn_like(hf.A_log))
    cfg = MambaConfig(
        dim=16, expand=expand, state_dim=d_state, conv_kernel=d_conv, proj_bias=proj_bias, dt_bc_norm=True
    )
    ours = MambaMixer(cfg, 0).double()
    missing = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing.missing_keys
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.tensor([[1] * 9, [0, 0] + [1] * 7])
    with torch.no_grad():
        ref = hf(x, attention_mask=mask)
        for scan in ("chunked", "sequential"):
            # transformers' slow path computes A and the scan in float32 even for float64 inputs.
            torch.testing.assert_close(ours(x, token_mask_BS=mask, scan=scan), ref, rtol=1e-5, atol=1e-6)
