"""SE-MoE ring memory: exact outputs, at most S layers held, the simulator's timeline, resync."""

from __future__ import annotations

import pytest
import torch

from moekit.layers import MoEConfig
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.offload import ExpertStore, LayerRing, ring_offload_model
from moekit.offload.simulate import ring_period, ring_sections, ring_timeline


def _model(num_layers=3, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=num_layers,
        num_heads=4,
        ffn_dim=64,
        moe=MoEConfig(dim=32, ffn_dim=24, num_experts=6, top_k=2),
    )
    return MoEForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("sections", [1, 2, 3, 5])
def test_ring_outputs_equal_the_resident_model_and_loads_follow_the_cycle(tmp_path, sections):
    model = _model()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6)
        logits = model(prompt).logits
    ring = ring_offload_model(model, tmp_path / "store", sections)
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=6)
        out = model(prompt)
    assert torch.equal(got, want)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
    assert model.moe_layers[0](torch.zeros(1, 32, dtype=torch.float64)).backend == "ring"
    num_l, s = 3, min(sections, 3)
    acquires = (1 + 5 + 1 + 1) * num_l  # prefill, 5 steps, forward, the backend probe (layer 0 only)
    acquires -= num_l - 1
    ring.close()  # waits for the copies in flight
    stats = ring.stats
    if s >= num_l:  # every layer stays resident after the first pass
        assert stats.layer_loads == num_l and stats.demand_loads == 1
    elif s == 1:  # nothing overlaps: every layer is a demand load
        assert stats.layer_loads == stats.demand_loads == acquires
    else:  # the first window, then one layer per layer run (SE-MoE's round robin)
        assert stats.layer_loads == acquires + s - 1 and stats.demand_loads == 1
    assert stats.max_resident_layers <= s
    assert stats.bytes_read == stats.layer_loads * ring.section_bytes


def test_the_ring_never_holds_more_than_s_layers_and_computes_only_from_its_sections(tmp_path, monkeypatch):
    model = _model(num_layers=4)
    ring = ring_offload_model(model, tmp_path / "store", 2)
    assert len(ring.w_in_SEHD) == len(ring.w_out_SEDF) == 2
    sections = {t.untyped_storage().data_ptr() for t in (*ring.w_in_SEHD, *ring.w_out_SEDF)}
    seen, held = set(), []
    compute = ExpertStore.compute

    def spy(w_in, w_out, x_ND, activation, out_ND):
        seen.update({w_in.untyped_storage().data_ptr(), w_out.untyped_storage().data_ptr()})
        held.append(len(ring.resident_layers()))
        compute(w_in, w_out, x_ND, activation, out_ND)

    def no_fresh_tensors(*args, **kwargs):
        raise AssertionError("the ring must load into its sections, never allocate experts")

    monkeypatch.setattr(ExpertStore, "compute", staticmethod(spy))
    monkeypatch.setattr(ExpertStore, "read", no_fresh_tensors)
    with torch.no_grad():
        model.generate(torch.randint(0, 64, (1, 4)), max_new_tokens=5)
    assert seen and seen <= sections
    assert max(held) <= 2 and ring.stats.max_resident_layers == 2
    ring.close()


def test_an_aborted_forward_resyncs_the_ring(tmp_path):
    model = _model()
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=4)
    ring = ring_offload_model(model, tmp_path / "store", 2)
    experts = model.moe_layers[1].experts

    def boom(x_ND, counts):
        raise RuntimeError("interrupted in layer 1")

    experts.forward_sorted = boom  # this layer only (an instance attribute)
    with pytest.raises(RuntimeError, match="interrupted"), torch.no_grad():
        model(prompt)
    del experts.forward_sorted
    assert sorted(ring.resident_layers()) == [1, 2]  # the window of the layer that failed
    demands = ring.stats.demand_loads
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=4)
    assert torch.equal(got, want)
    assert ring.stats.demand_loads == demands + 1  # layer 0 was missing: loaded on demand, then the cycle
    ring.close()


def test_ring_timeline_matches_a_hand_computed_timeline():
    # L = 3 layers, S = 2, compute 1 s, load 2 s (100 bytes at 50 B/s), two tokens. By hand:
    # layer 0 demand-loads [0, 2] and runs [2, 3]; layer 1 was queued at 2 -> [2, 4], runs [4, 5];
    # layer 2 queued at 3 -> [4, 6], runs [6, 7]; from then every layer waits for its load and the
    # period is max(compute, load) = 2: starts 8, 10, 12, end 13.
    res = ring_timeline(2, [100] * 3, [1.0] * 3, storage_bw=50.0, num_sections=2)
    assert res.layer_starts == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert res.seconds == 13.0 and res.stall_s == 7.0
    assert (res.layer_loads, res.demand_loads, res.bytes_read) == (7, 1, 700)
    # One section: nothing overlaps, every layer is load + compute = 3 s.
    one = ring_timeline(2, [100] * 3, [1.0] * 3, 50.0, 1)
    assert one.seconds == 18.0 and one.demand_loads == one.layer_loads == 6
    # S = L: the first pass loads every layer once, the second token computes only.
    full = ring_timeline(2, [100] * 3, [1.0] * 3, 50.0, 3)
    assert full.layer_starts == [2.0, 4.0, 6.0, 7.0, 8.0, 9.0] and full.layer_loads == 3
    # Fast link (load 0.5 s): the steady period is compute, 1 s.
    fast = ring_timeline(4, [100] * 3, [1.0] * 3, 200.0, 2)
    gaps = [b - a for a, b in zip(fast.layer_starts[3:], fast.layer_starts[4:], strict=False)]
    assert gaps == [ring_period(1.0, 0.5, 2, 3)] * len(gaps) == [1.0] * len(gaps)
    assert ring_period(1.0, 2.0, 2, 3) == 2.0 and ring_period(1.0, 2.0, 1, 3) == 3.0
    assert ring_period(1.0, 2.0, 3, 3) == 1.0


def test_the_simulator_counts_the_loads_the_ring_makes(tmp_path):
    model = _model(num_layers=4)
    ring = ring_offload_model(model, tmp_path / "store", 3)
    with torch.no_grad():
        model.generate(torch.randint(0, 64, (1, 3)), max_new_tokens=5)  # prefill + 4 steps
    ring.close()  # waits for the copies in flight
    sim = ring_timeline(5, [ring.section_bytes] * 4, [1e-3] * 4, 1e9, 3)
    assert (ring.stats.layer_loads, ring.stats.demand_loads) == (sim.layer_loads, sim.demand_loads)
    assert ring.stats.bytes_read == sim.bytes_read


def test_section_count_rule_and_bad_arguments(tmp_path):
    # SE-MoE: the smallest K with copy <= (K - 1) * compute, capped by the memory budget.
    assert ring_sections(copy_s=2.5, compute_s=1.0, section_bytes=10, budget_bytes=100) == 4
    assert ring_sections(copy_s=1.0, compute_s=1.0, section_bytes=10, budget_bytes=100) == 2
    assert ring_sections(copy_s=0.2, compute_s=1.0, section_bytes=10, budget_bytes=100) == 2
    assert ring_sections(copy_s=9.0, compute_s=1.0, section_bytes=10, budget_bytes=35) == 3
    with pytest.raises(ValueError, match="holds no ring section"):
        ring_sections(1.0, 1.0, section_bytes=10, budget_bytes=5)
    model = _model()
    with pytest.raises(ValueError, match="num_sections"):
        ring_offload_model(model, tmp_path / "s", 0)
    with pytest.raises(ValueError, match="plain expert store"):
        LayerRing(object(), 2)


def test_cli_generate_with_ring_sections(tmp_path, capsys):
    from moekit.cli.main import main
    from moekit.data import save_tokenizer, train_tokenizer
    from moekit.models import get_preset

    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    MoEForCausalLM(get_preset("moe-tiny")).save_pretrained(folder)
    save_tokenizer(train_tokenizer(["def f(x):\n    return x + 1\n" * 30], vocab_size=300), folder)
    base = [
        "generate",
        "--model",
        str(folder),
        "--prompt",
        "def ",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]
    assert main(base) == 0
    want = capsys.readouterr().out
    assert main([*base, "--ring-sections", "1", "--store-bandwidth", "1e9"]) == 0
    captured = capsys.readouterr()
    assert captured.out == want and "layer_loads" in captured.err
    assert main([*base, "--ring-sections", "2", "--expert-cache-bytes", "50%"]) == 2
    err = capsys.readouterr().err
    assert "--ring-sections" in err and len(err.strip().splitlines()) == 1
