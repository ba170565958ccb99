"""Placement planning: ILP optimal on tiny instances, planner picks the best, plans apply exactly."""

from __future__ import annotations

import pytest
import torch

from moekit.parallel.placement import (
    Placement,
    apply_placement,
    brute_force,
    plan_placement,
    replicate_hot_experts,
    round_robin,
    simulate,
    solve_ilp,
    synthetic_trace,
    trace_stats,
)


@pytest.mark.parametrize("traffic", ["stay", "home"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ilp_is_optimal_on_tiny_instances(seed, traffic):
    trace = synthetic_trace(num_layers=3, num_experts=4, num_tokens=300, seed=seed)
    stats = trace_stats(trace, 2)
    plan = solve_ilp(stats, 2, load_slack=0.5, time_limit_s=20, traffic=traffic)
    assert plan is not None
    moves = simulate(stats, plan, traffic=traffic).token_moves
    assert moves == pytest.approx(brute_force(stats, 2, 0.5, traffic))
    assert moves == pytest.approx(plan.extra_objective)


def test_planner_beats_round_robin_and_keeps_the_load_bound(tmp_path):
    trace = synthetic_trace(num_layers=4, num_experts=8, num_tokens=3000, skew=0.6)
    result = plan_placement(trace, num_devices=4, load_slack=0.25, time_limit_s=4)
    chosen = simulate(trace_stats(trace, 4), result.placement)
    for name, rep in result.reports.items():
        if rep.max_imbalance <= 1.25 + 1e-9:
            assert chosen.token_moves <= rep.token_moves + 1e-9, name
    assert chosen.token_moves < 0.8 * result.reports["round_robin"].token_moves
    path = tmp_path / "plan.json"
    result.placement.to_json(path)
    again = Placement.from_json(path)
    assert again.device_of == result.placement.device_of


def test_replication_reduces_imbalance():
    trace = synthetic_trace(num_layers=2, num_experts=8, num_tokens=3000, skew=1.5)
    stats = trace_stats(trace, 4)
    base = round_robin(2, 8, 4)
    rep = replicate_hot_experts(stats, base, slots_per_device=3)
    assert simulate(stats, rep).imbalance < simulate(stats, base).imbalance
    assert all(len(v) >= 1 for v in rep.replicas[0].values())
    with pytest.raises(ValueError, match="below the 2 experts"):
        replicate_hot_experts(stats, base, slots_per_device=1)


def test_bad_plans_and_sizes():
    trace = synthetic_trace(num_layers=2, num_experts=8, num_tokens=100)
    stats = trace_stats(trace, 2)
    with pytest.raises(ValueError, match="do not divide over 3 devices"):
        round_robin(2, 8, 3)
    with pytest.raises(ValueError, match="placement covers 3 layers"):
        simulate(stats, round_robin(3, 8, 2))
    with pytest.raises(ValueError, match="not a moekit placement plan"):
        import json
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"hello": 1}, f)
        Placement.from_json(f.name)


def test_apply_placement_preserves_the_function():
    from moekit.layers import MoEConfig, MoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(dim=8, ffn_dim=8, num_experts=4, top_k=2, gating_residual=True, use_expert_bias=True)
    model = torch.nn.ModuleList([MoELayer(cfg), MoELayer(cfg)]).double()
    with torch.no_grad():
        for layer in model:
            layer.router.residual_weight.normal_()
            layer.router.expert_bias.normal_()

    def run(x):
        o1 = model[0](x)
        o2 = model[1](x + o1.hidden, prev_logits=o1.routing.router_logits)
        return o2.hidden

    x = torch.randn(20, 8, dtype=torch.float64)
    before = run(x)
    plan = Placement([[1, 0, 1, 0], [0, 1, 1, 0]], 2)
    apply_placement(model, plan)
    torch.testing.assert_close(run(x), before, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="plans 1 MoE layers, the model has 2"):
        apply_placement(model, Placement([[0, 1, 0, 1]], 2))


def test_plan_cli(tmp_path, capsys):
    from moekit.analysis import save_trace
    from moekit.cli.main import main

    path = save_trace(
        synthetic_trace(num_layers=2, num_experts=4, num_tokens=400), tmp_path / "t.safetensors"
    )
    out = tmp_path / "plan.json"
    assert main(["plan", "--trace", str(path), "--devices", "2", "--out", str(out), "--time-limit", "5"]) == 0
    text = capsys.readouterr().out
    assert "round_robin" in text and "ilp" in text
    assert len(Placement.from_json(out).device_of) == 2
    assert main(["plan", "--trace", str(path), "--devices", "3", "--out", str(out)]) == 2
    assert "do not divide over 3 devices" in capsys.readouterr().err
