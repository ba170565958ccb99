"""EdgeMoE (issue 20 item 3): bit-width search by tolerance, the second-order predictor and the
eviction priority, on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from moekit.compress.edgemoe import (
    BitwidthSearchConfig,
    SecondOrderTransitions,
    bitwidth_search,
    edgemoe_predictor,
    eviction_priority,
    fake_quantized,
    layer_distance,
    search_model_bits,
)
from moekit.models import MoEForCausalLM, get_preset
from moekit.surgery import lm_loss

torch.set_num_threads(1)

# Score drop of expert e at width b (0 at 32 bits); the score is 1 - the sum over experts.
PENALTY = [
    {32: 0.0, 8: 0.001, 4: 0.002, 2: 0.05},
    {32: 0.0, 8: 0.001, 4: 0.003, 2: 0.004},
    {32: 0.0, 8: 0.002, 4: 0.01, 2: 0.2},
]


def test_bitwidth_search_lowers_least_important_first_within_tolerance():
    seen = []

    def evaluate(bits):
        seen.append(bits)
        return 1.0 - sum(PENALTY[e][b] for e, b in enumerate(bits[0]))

    res = bitwidth_search(evaluate, [3], BitwidthSearchConfig(tolerance=0.01))
    # By hand: importance (drop at 2 bits) = [.05, .004, .2] -> order e1, e0, e2.
    #   to 8 bits: all three fit (drops .001, .002, .004);
    #   to 4 bits: e1 (.006) and e0 (.007) fit, e2 would reach .015 and stays at 8;
    #   to 2 bits: e1 (.008) fits; e0 (.056) and e2 (.204) do not.
    assert res.importance == [pytest.approx([0.05, 0.004, 0.2])]
    assert res.bits == [[4, 2, 8]] and res.score == pytest.approx(1 - 0.008) and res.baseline == 1.0
    assert res.evaluations == len(seen) == 1 + 3 + 3 * 3
    assert bitwidth_search(evaluate, [3], BitwidthSearchConfig(tolerance=1.0)).bits == [[2, 2, 2]]
    assert bitwidth_search(evaluate, [3], BitwidthSearchConfig(tolerance=0.0)).bits == [[32, 32, 32]]
    with pytest.raises(ValueError, match="tolerance"):
        BitwidthSearchConfig(tolerance=-1)


def test_search_model_bits_scores_fake_quantized_models():
    torch.manual_seed(0)
    model = MoEForCausalLM(get_preset("moe-tiny")).eval()
    data = [torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))]
    res = search_model_bits(
        model, lambda m: -lm_loss(m, data), BitwidthSearchConfig(tolerance=1e9, group_size=64)
    )
    assert res.bits == [[2] * 4, [2] * 4]
    assert res.score == pytest.approx(-lm_loss(fake_quantized(model, res.bits, 64), data))
    assert res.baseline == pytest.approx(-lm_loss(model, data))


def _trace():
    # 4 tokens, 3 MoE layers of 2 experts, top-1.
    ids = [
        torch.tensor([[0], [0], [1], [1]]),
        torch.tensor([[0], [0], [0], [1]]),
        torch.tensor([[1], [0], [1], [1]]),
    ]
    return SecondOrderTransitions.fit(ids, [2, 2, 2])


def test_second_order_transitions_condition_on_the_previous_layer():
    tr = _trace()
    # P(layer 2 | layer 1 = 0): tokens 0, 1, 2 go to 1, 0, 1 -> [1/3, 2/3].
    assert tr.probabilities(1, 0).tolist() == pytest.approx([1 / 3, 2 / 3])
    # ... and layer 0 = 0 (tokens 0, 1): [1/2, 1/2]; layer 0 = 1 (token 2): [0, 1].
    assert tr.probabilities(1, 0, 0).tolist() == pytest.approx([0.5, 0.5])
    assert tr.probabilities(1, 0, 1).tolist() == pytest.approx([0.0, 1.0])
    assert tr.predict(1, 0, None, 1) == [1] and tr.predict(1, 0, 0, 1) == [0]  # tie -> lower id
    # unseen pair (layer 0 = 1, layer 1 = 1 was seen; layer 0 = 0, layer 1 = 1 was not): backs off
    assert tr.probabilities(1, 1, 0).tolist() == pytest.approx(tr.probabilities(1, 1).tolist())
    predict = edgemoe_predictor(tr, top_n=1)
    assert predict(0, torch.zeros(2, 4), torch.tensor([[0], [1]])) == [0]  # first order at layer 0
    # token 0: (b=0, a=0) -> 0; token 1: (b=1, a=0) -> 1. First order alone would say {1}.
    assert predict(1, torch.zeros(2, 4), torch.tensor([[0], [0]])) == [0, 1]
    assert predict(2, torch.zeros(2, 4), torch.tensor([[0], [0]])) == []  # last layer: nothing next


def test_eviction_priority_prefers_layers_that_run_soon():
    # 4 MoE layers, layer 1 just ran: layer 2 runs next (distance 0), layer 1 last (distance 3).
    assert [layer_distance(layer, 1, 4) for layer in range(4)] == [2, 3, 0, 1]
    assert eviction_priority(8, 2, 1, 4) == 8.0 and eviction_priority(8, 1, 1, 4) == 2.0
    assert eviction_priority(1, 2, 1, 4) < eviction_priority(8, 1, 1, 4)  # frequency still counts


def test_expert_cache_edgemoe_policy_evicts_the_layer_furthest_ahead(tmp_path):
    from moekit.layers import MoEConfig
    from moekit.models import ModelConfig
    from moekit.offload import ExpertCache, ExpertStore

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=3,
        num_heads=4,
        ffn_dim=64,
        moe=MoEConfig(dim=32, ffn_dim=24, num_experts=4, top_k=2),
    )
    model = MoEForCausalLM(cfg).eval()
    w = model.moe_layers[0].experts
    per = (w.w_in[0].numel() + w.w_out[0].numel()) * w.w_in.element_size()
    ExpertStore.write(model, tmp_path / "s")
    cache = ExpertCache(ExpertStore(tmp_path / "s"), budget_bytes=3 * per, policy="edgemoe")
    for key in ((0, 0), (1, 0), (2, 0)):  # one use each; the latest get is layer 2
        cache.get(*key)
    # Next to run: layer 0 (distance 0), then 1 (1); layer 2 just ran (2): it is evicted, where
    # LRU would evict (0, 0).
    cache.get(2, 1)
    assert cache.is_resident(0, 0) and cache.is_resident(1, 0) and not cache.is_resident(2, 0)
    cache.close()
    with pytest.raises(ValueError, match="edgemoe"):
        ExpertCache(ExpertStore(tmp_path / "s"), budget_bytes=3 * per, policy="nope")


def test_edgemoe_prefetch_runs_in_offloaded_generation(tmp_path):
    from moekit.analysis import record_trace
    from moekit.layers import MoEConfig
    from moekit.models import ModelConfig
    from moekit.offload import offload_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=3,
        num_heads=4,
        ffn_dim=64,
        moe=MoEConfig(dim=32, ffn_dim=24, num_experts=8, top_k=2),
    )
    model = MoEForCausalLM(cfg).double().eval()
    prompt = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8)
    trace = record_trace(model, [(torch.randint(0, 64, (4, 32)), None) for _ in range(4)])
    w = model.moe_layers[0].experts
    per = (w.w_in[0].numel() + w.w_out[0].numel()) * w.w_in.element_size()
    cache = offload_model(model, tmp_path / "s", cache_bytes=6 * per, prefetch="edgemoe", trace=trace)
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=8)
    assert torch.equal(got, want)  # prefetching changes what is resident, never the tokens
    assert cache.stats.prefetches > 0
    cache.close()
