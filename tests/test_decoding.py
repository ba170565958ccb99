"""Fast generation (moekit.models.decode) and MoE decoding strategies (moekit.infer.decoding).

Tiny float64 models, so argmax ties and batch-shape rounding cannot flip tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit.infer.decoding import SelfContrastSession, WeakRouting, contrast_scores, weak_routing
from moekit.models import MoEForCausalLM
from moekit.models.decode import DecodeSession
from moekit.models.generation import Sampler, generate, iter_tokens
from moekit.models.presets import moe_tiny


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoEForCausalLM(moe_tiny()).double().eval()


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def test_matches_reference_generate_greedy_and_sampled(model):
    # The reference recomputes the whole sequence through model.forward every step (no cache).
    ids = _prompt(7, 1)
    ref_greedy = model.generate(ids, max_new_tokens=12, use_cache=False)
    assert torch.equal(generate(model, ids, max_new_tokens=12), ref_greedy)
    fast = generate(
        model,
        ids,
        max_new_tokens=12,
        sampler=Sampler(temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(5)),
    )
    ref = model.generate(
        ids,
        max_new_tokens=12,
        use_cache=False,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(fast, ref)


def test_batched_left_padded_equals_one_by_one(model):
    prompts = [_prompt(n, seed) for seed, n in enumerate((9, 3, 6))]
    width = max(p.shape[1] for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    out = generate(model, batch, mask, max_new_tokens=10)
    for row, p in enumerate(prompts):
        alone = generate(model, p, max_new_tokens=10)
        assert torch.equal(out[row, width:], alone[0, p.shape[1] :]), row


def test_eos_stops_and_pads(model):
    ids = _prompt(5, 2)
    free = generate(model, ids, max_new_tokens=8)
    eos = int(free[0, 5 + 2])  # the third generated token
    stopped = generate(model, ids, max_new_tokens=8, eos_token_id=eos)
    assert stopped.shape[1] <= 5 + 3 and int(stopped[0, -1]) == eos


def test_session_rejects_right_padding(model):
    with pytest.raises(ValueError, match="left"):
        DecodeSession(model, _prompt(4, 0), torch.tensor([[1, 1, 1, 0]]), 4)


def test_dynamic_k_changes_experts_used(model):
    ids = _prompt(6, 3)
    counts = {}
    for k in (1, 2, 3):
        session = DecodeSession(model, ids, max_new_tokens=5, moe_k=k, count_experts=True)
        list(iter_tokens(session, 5))
        counts[k] = session.expert_assignments
    # (6 prompt + 4 decoded) tokens x 2 MoE layers x k experts each.
    assert counts == {k: 10 * 2 * k for k in (1, 2, 3)}


def test_scmoe_beta_zero_is_greedy(model):
    ids = _prompt(8, 4)
    greedy = generate(model, ids, max_new_tokens=10)
    session = SelfContrastSession(model, ids, max_new_tokens=10, alpha=0.1, beta=0.0, weak="rank:2")
    assert torch.equal(generate(model, ids, max_new_tokens=10, source=session), greedy)


def test_scmoe_respects_plausibility_mask(model):
    ids = _prompt(8, 5)
    alpha = 0.3
    session = SelfContrastSession(model, ids, max_new_tokens=8, alpha=alpha, beta=2.0, weak="rank:3")
    for next_B in iter_tokens(session, 8):
        probs_V = session.last_strong_BV[0].softmax(-1)
        assert probs_V[int(next_B[0])] >= alpha * probs_V.max() - 1e-12
    # And the score function on its own: exactly the tokens above alpha * max survive.
    strong, weak = torch.randn(3, 50), torch.randn(3, 50)
    scores = contrast_scores(strong, weak, alpha=alpha, beta=0.5)
    p = strong.softmax(-1)
    assert torch.equal(torch.isfinite(scores), p >= alpha * p.max(-1, keepdim=True).values * (1 - 1e-6))
    kept = torch.isfinite(scores)
    expected = 1.5 * strong.log_softmax(-1) - 0.5 * weak.log_softmax(-1)
    torch.testing.assert_close(scores[kept], expected[kept].float())


def test_rank_routing_keeps_only_the_kth_expert_and_restores(model):
    x = torch.randn(1, 5, model.config.dim, dtype=torch.float64)
    layer = model.moe_layers[0]
    top3 = layer(x, k=3).routing.expert_ids
    with weak_routing(model, WeakRouting.parse("rank:3")) as moe_k:
        assert moe_k is None
        routing = layer(x).routing
    assert torch.equal(routing.expert_ids, top3[:, 2:3])
    assert torch.equal(routing.weights, torch.ones_like(routing.weights))
    assert "forward" not in vars(layer.router) and layer.routing_override is None
    with pytest.raises(ValueError, match="only 4 experts"), weak_routing(model, WeakRouting(k=5)):
        pass
    with pytest.raises(ValueError, match="rank:K"):
        WeakRouting.parse("third")


def test_scmoe_weak_top1_and_sampling_are_valid(model):
    ids = _prompt(6, 6)
    session = SelfContrastSession(model, ids, max_new_tokens=6, weak="top:1", beta=0.5)
    sampler = Sampler(temperature=1.0, generator=torch.Generator().manual_seed(0))
    out = generate(model, ids, max_new_tokens=6, source=session, sampler=sampler)
    assert out.shape == (1, 12) and int(out.min()) >= 0
    assert math.isfinite(float(session.last_strong_BV.sum()))


def test_cli_generate_scmoe_dynamic_k_offloaded(tmp_path, capsys):
    from moekit.cli.main import main
    from moekit.data import save_tokenizer, train_tokenizer

    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    MoEForCausalLM(moe_tiny()).save_pretrained(folder)
    save_tokenizer(train_tokenizer(["def f(x):\n    return x + 1\n" * 30], vocab_size=300), folder)
    base = ["generate", "--model", str(folder), "--prompt", "def ", "--max-new-tokens", "6"]
    assert main([*base, "--decode", "scmoe", "--scmoe-weak", "rank:2", "--k", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    offload = ["--expert-cache-bytes", "50%", "--prefetch", "pregate", "--store", str(tmp_path / "store")]
    assert main([*base, "--decode", "greedy", *offload]) == 0
    captured = capsys.readouterr()
    assert "offload:" in captured.err and "hits" in captured.err
    assert main([*base, "--decode", "greedy", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == captured.out  # offloading does not change greedy tokens
    assert main([*base, "--prefetch", "stats", "--expert-cache-bytes", "1e4"]) == 2
    assert "--trace" in capsys.readouterr().err


@pytest.mark.parametrize(
    "variant", ["plain", "sigmoid_bias_shared", "dense_first", "groups", "after_topk", "random_fixed"]
)
def test_fast_decode_path_matches_general_layers(variant):
    from moekit.models.decode import fast_decode_supported

    cfg = moe_tiny()
    moe_k = 3
    if variant == "groups":  # the router's own group masking: 2 groups of 2, one kept
        moe = cfg.moe.replace(
            score_func="sigmoid", num_expert_groups=2, num_limited_groups=1, group_score="max"
        )
        cfg, moe_k = cfg.replace(moe=moe), 2
    elif variant in ("after_topk", "random_fixed"):
        moe = cfg.moe.replace(softmax_order="after_topk", routed_scaling_factor=1.5)
        if variant == "random_fixed":
            moe = cfg.moe.replace(router_type="random_fixed")
        cfg = cfg.replace(moe=moe)
    if variant == "sigmoid_bias_shared":
        moe = cfg.moe.replace(
            score_func="sigmoid", use_expert_bias=True, shared_ffn_dim=32, routed_scaling_factor=2.0
        )
        cfg = cfg.replace(moe=moe, qk_norm="none")
    elif variant == "dense_first":
        cfg = cfg.replace(num_dense_first_layers=1, num_layers=3)
    torch.manual_seed(1)
    model = MoEForCausalLM(cfg).double().eval()
    if variant == "sigmoid_bias_shared":
        for mlp in model.moe_layers:
            mlp.router.expert_bias.normal_(0, 0.1)
    assert fast_decode_supported(model)
    batch = torch.randint(2, 512, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    outs = []
    for fast in (True, False):
        session = DecodeSession(model, batch, mask, max_new_tokens=6, moe_k=moe_k, count_experts=True)
        session.fast = fast
        scores = [session.prefill()]
        for _ in range(5):
            scores.append(session.step(scores[-1].argmax(-1)))
        outs.append((torch.stack(scores), session.expert_assignments))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-9, atol=1e-9)
    assert outs[0][1] == outs[1][1]


def test_compiled_decode_step_matches_general_layers_without_recompiling():
    """compile=True: one graph serves every prompt and length, and matches the general layers."""
    from torch._dynamo.utils import counters

    cfg = moe_tiny()
    moe = cfg.moe.replace(
        score_func="sigmoid", use_expert_bias=True, shared_ffn_dim=32, routed_scaling_factor=2.0
    )
    cfg = cfg.replace(moe=moe, num_dense_first_layers=1, num_layers=3)
    torch.manual_seed(3)
    model = MoEForCausalLM(cfg).double().eval()
    for mlp in model.moe_layers:
        mlp.router.expert_bias.normal_(0, 0.1)
    torch._dynamo.reset()
    counters.clear()
    for prompt_len, new_tokens in ((5, 7), (9, 4)):
        prompt = torch.randint(2, 512, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        outs = []
        for compiled in (True, False):
            session = DecodeSession(
                model, prompt, max_new_tokens=new_tokens, compile=compiled, count_experts=True
            )
            if not compiled:
                session.fast = False
            scores = [session.prefill()]
            for _ in range(new_tokens - 1):
                scores.append(session.step(scores[-1].argmax(-1)))
            outs.append((torch.stack(scores), session.expert_assignments, session.cache.seq_len))
        # RMSNorm runs in float32 by design; inductor's fused float32 kernels round differently.
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
        assert outs[0][1:] == outs[1][1:]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # Batch > 1 ignores compile (the eager fast path handles ragged rows).
    assert DecodeSession(model, torch.ones(2, 3, dtype=torch.long), compile=True)._compiled is None


def test_fast_decode_follows_from_the_layers_components(model, tmp_path):
    """Each component says whether the fast path may skip it; nothing is decided by type names."""
    import copy

    from moekit.compress import PruneConfig, dynamic_prune
    from moekit.models.decode import fast_decode_supported

    assert fast_decode_supported(model)
    cases = {
        "top_p": moe_tiny().moe.replace(router_type="top_p"),
        "expert_choice": moe_tiny().moe.replace(router_type="expert_choice"),
        "gating_residual": moe_tiny().moe.replace(gating_residual=True),
        "capacity": moe_tiny().moe.replace(capacity_factor=1.0),
        "zero_experts": moe_tiny().moe.replace(num_zero_experts=1),
    }
    for name, moe in cases.items():
        assert not fast_decode_supported(MoEForCausalLM(moe_tiny().replace(moe=moe))), name
    pruned = dynamic_prune(copy.deepcopy(model), PruneConfig(threshold=0.5))  # post-processes forward
    assert not pruned.moe_layers[0].router.supports_route_small
    assert not fast_decode_supported(pruned)
    with weak_routing(model, WeakRouting.parse("rank:2")):
        assert not fast_decode_supported(model)  # a routing override is set
    assert fast_decode_supported(model)


def test_scmoe_weak_logits_equal_a_forward_routed_to_the_rank_k_expert(model):
    """Issue 20 item 9: with beta > 0, the weak pass is the model with each layer using only each
    token's rank-k expert at weight 1, checked against a forward whose MoE outputs are replaced by
    a hand-written rank-k computation (no override API involved)."""
    from dataclasses import replace

    rank = 3
    ids = _prompt(6, 9)
    session = SelfContrastSession(model, ids, max_new_tokens=5, beta=0.5, weak=f"rank:{rank}")
    weak, tokens = [], []
    for next_B in iter_tokens(session, 5):
        weak.append(session.last_weak_BV[0].clone())
        tokens.append(int(next_B[0]))

    def rank_only(layer, args, kwargs, out):
        x = args[0]
        x_TD = x.reshape(-1, x.shape[-1])
        scores_TE = torch.softmax(x_TD @ layer.router.weight.t(), dim=-1)
        expert_T = scores_TE.topk(rank, dim=-1).indices[:, rank - 1]
        y_TD = torch.cat(
            [layer.experts.expert_forward(int(e), x_TD[t : t + 1]) for t, e in enumerate(expert_T)]
        )
        return replace(out, hidden=y_TD.reshape(x.shape))

    handles = [layer.register_forward_hook(rank_only, with_kwargs=True) for layer in model.moe_layers]
    try:
        with torch.no_grad():
            for step, weak_V in enumerate(weak):
                prefix = torch.cat([ids, torch.tensor([tokens[:step]], dtype=torch.long)], dim=1)
                want_V = model(prefix).logits[0, -1].float()
                torch.testing.assert_close(weak_V, want_V, rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()
    strong_model_logits = model(ids).logits[0, -1].float()
    assert not torch.allclose(weak[0], strong_model_logits, atol=1e-3)  # the weak pass really differs


class _WeakPrefillUnrouted(SelfContrastSession):
    """Mutant: the weak prompt cache is built with the strong routing (the override is missing)."""

    def prefill(self):
        return self._combine(self.strong_session.prefill(), self.weak_session.prefill())


class _WeakReusesStrongCache(SelfContrastSession):
    """Mutant: each weak step attends to the strong pass's cached keys/values."""

    def step(self, next_B):
        strong_BV = self.strong_session.step(next_B)
        sc, wc = self.strong_session.cache, self.weak_session.cache
        wc.keys, wc.values = [k.clone() for k in sc.keys], [v.clone() for v in sc.values]
        wc.lengths = [n - 1 for n in sc.lengths]  # the weak step appends its own key for the new token
        return self._combine(strong_BV, self._weak(self.weak_session.step, next_B))


class _WeakStepUnrouted(SelfContrastSession):
    """Mutant: decode steps of the weak pass run without the weak routing."""

    def step(self, next_B):
        return self._combine(self.strong_session.step(next_B), self.weak_session.step(next_B))


def _scmoe_max_errors(model, session_cls, weak: str, steps: int = 5) -> tuple[float, float, float]:
    """Decodes with ``session_cls`` at beta > 0 and compares, at every step, the strong and the weak
    logits with a full forward of the whole prefix (no cache): plain, and inside ``weak_routing``.
    Returns (max strong error, max weak error, min |weak - strong| gap of the reference)."""
    ids = torch.cat([_prompt(6, 11), _prompt(6, 12)])
    session = session_cls(model, ids, max_new_tokens=steps, beta=1.0, weak=weak)
    strong, weak_logits, chosen = [], [], []
    for next_B in iter_tokens(session, steps):
        strong.append(session.last_strong_BV.clone())
        weak_logits.append(session.last_weak_BV.clone())
        chosen.append(next_B.clone())
    err_s = err_w = 0.0
    gap = math.inf
    with torch.no_grad():
        for t in range(steps):
            prefix = torch.cat([ids, *[c[:, None] for c in chosen[:t]]], dim=1)
            want_s = model(prefix).logits[:, -1].float()
            with weak_routing(model, WeakRouting.parse(weak)) as moe_k:
                want_w = model(prefix, moe_k=moe_k).logits[:, -1].float()
            err_s = max(err_s, float((strong[t] - want_s).abs().max()))
            err_w = max(err_w, float((weak_logits[t] - want_w).abs().max()))
            gap = min(gap, float((want_w - want_s).abs().max()))
    return err_s, err_w, gap


@pytest.mark.parametrize("weak", ["rank:2", "top:1"])
def test_scmoe_strong_and_weak_logits_equal_full_forwards_at_every_step(model, weak):
    """Issue 20 item 9: at beta > 0, each decode step's strong and weak logits (two KV caches) equal
    a cache-free forward of the whole prefix under the model's routing and under the weak routing."""
    err_s, err_w, gap = _scmoe_max_errors(model, SelfContrastSession, weak)
    assert err_s < 1e-5 and err_w < 1e-5, (err_s, err_w)
    assert gap > 1e-3  # the weak routing really changes the logits, so the check can tell them apart


@pytest.mark.parametrize("mutant", [_WeakPrefillUnrouted, _WeakReusesStrongCache, _WeakStepUnrouted])
def test_scmoe_weak_pass_check_catches_cache_and_routing_mutants(model, mutant):
    _, err_w, _ = _scmoe_max_errors(model, mutant, "rank:2")
    assert err_w > 1e-3, f"{mutant.__name__} went unnoticed ({err_w:.2e})"
