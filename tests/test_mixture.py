"""moekit.mixture (MoE²): the mixture distribution, the subset search, the masking property, configs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from moekit.mixture import (
    ExpertProfile,
    GateConfig,
    HardwareProfile,
    LatencyClass,
    MixtureConfig,
    MixtureSession,
    Objective,
    branch_and_bound,
    exhaustive,
    masking_gap,
    mix_logprobs,
    monotonicity_report,
    train_gate,
)
from moekit.mixture.select import best_single, greedy, random_subset
from moekit.models import MoEForCausalLM
from moekit.models.presets import moe_tiny


@pytest.fixture(autouse=True)
def _one_thread():
    # The gate and the tiny models are far too small for intra-op threads; on a shared 2-core
    # machine one thread is several times faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(dim: int, seed: int, vocab: int = 512) -> MoEForCausalLM:
    base = moe_tiny()
    cfg = base.replace(dim=dim, head_dim=dim // 4, vocab_size=vocab, moe=base.moe.replace(dim=dim))
    torch.manual_seed(seed)
    return MoEForCausalLM(cfg).double().eval()


def test_mix_logprobs_is_the_weighted_sum_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 50, generator=g, dtype=torch.float64) * 4 for _ in range(3)]
    logits[2] = logits[2][:, :40]  # a smaller vocabulary: ids 40.. get 0 from it
    w = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [1e-9, 0.5, 0.5 - 1e-9]], dtype=torch.float64)
    want = torch.zeros(3, 50, dtype=torch.float64)
    for e, x in enumerate(logits):
        want[:, : x.shape[1]] += w[:, e : e + 1] * x.softmax(-1)
    got = mix_logprobs(logits, w)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.exp(), want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(3, dtype=torch.float64))


def test_mixture_session_is_the_weighted_sum_of_expert_distributions():
    # Oracle: each expert's full forward over the whole text (no cache), softmax, weighted sum,
    # in float64 models; the session decodes through every expert's KV cache (whose logits come
    # back as float32, hence the tolerance). The third expert has a smaller vocabulary.
    models = [_tiny(32, 0), _tiny(64, 1), _tiny(32, 2, vocab=400)]
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    session = MixtureSession(models, w, ids, max_new_tokens=4)

    def oracle(seq):
        with torch.no_grad():
            total = torch.zeros(512, dtype=torch.float64)
            for m, wi in zip(models, w, strict=True):
                p = m(seq).logits[0, -1].softmax(-1)
                total[: p.shape[0]] += wi * p
        return total

    seq = ids
    logp = session.prefill()
    assert logp.dtype == torch.float64 and logp.shape == (1, 512)
    for _ in range(4):
        torch.testing.assert_close(logp[0].exp(), oracle(seq), rtol=1e-5, atol=1e-8)
        assert float(logp[0, 400:].exp().sum()) == pytest.approx(float(oracle(seq)[400:].sum()), rel=1e-5)
        nxt = logp.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        if seq.shape[1] - ids.shape[1] < 4:
            logp = session.step(nxt)
    assert all(s.cache.seq_len == ids.shape[1] + 3 for s in session.sessions)  # the cached path ran


def test_mix_logprobs_hand_computed():
    a = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    b = torch.log(torch.tensor([[0.9, 0.1]], dtype=torch.float64))
    out = mix_logprobs([a, b], torch.tensor([0.25, 0.75], dtype=torch.float64)).exp()
    torch.testing.assert_close(out, torch.tensor([[0.8, 0.2]], dtype=torch.float64))


def _instance(rng: random.Random, n: int, monotone: bool):
    w = [rng.random() for _ in range(n)]
    e = [rng.uniform(0.1, 1.0) for _ in range(n)]
    pen = [0.0 if monotone else rng.uniform(0, 0.08) for _ in range(n)]
    return e, lambda s: math.log(sum(w[i] for i in s)) - sum(pen[i] for i in s)


def test_branch_and_bound_equals_exhaustive_with_fewer_evaluations():
    rng = random.Random(0)
    bnb_total = exh_total = fewer = cases = 0
    for _ in range(150):
        n = rng.randint(4, 9)
        energy, fn = _instance(rng, n, monotone=True)
        budget = rng.uniform(0.25, 0.75) * sum(energy)
        a, b = exhaustive(Objective(fn), energy, budget), branch_and_bound(Objective(fn), energy, budget)
        assert b.value == pytest.approx(a.value, abs=1e-12)
        assert b.energy <= budget + 1e-9
        bnb_total, exh_total = bnb_total + b.evaluations, exh_total + a.evaluations
        fewer, cases = fewer + (b.evaluations < a.evaluations), cases + 1
    print(f"evaluations: branch and bound {bnb_total}, exhaustive {exh_total}; fewer in {fewer}/{cases}")
    assert bnb_total < 0.4 * exh_total
    assert fewer >= 0.9 * cases


def test_slack_makes_the_search_exact_for_a_non_monotone_objective():
    rng = random.Random(1)
    missed_plain = 0
    for _ in range(100):
        n = rng.randint(3, 7)
        energy, fn = _instance(rng, n, monotone=False)
        budget = rng.uniform(0.3, 0.8) * sum(energy)
        report = monotonicity_report(Objective(fn), n)
        a = exhaustive(Objective(fn), energy, budget)
        b = branch_and_bound(Objective(fn), energy, budget, slack=report.max_drop)
        assert b.value == pytest.approx(a.value, abs=1e-12)
        plain = branch_and_bound(Objective(fn), energy, budget)
        missed_plain += plain.value < a.value - 1e-12
    assert missed_plain > 0  # without slack the monotone bound really is wrong here


def test_baselines_respect_the_budget_and_count_evaluations():
    rng = random.Random(2)
    energy, fn = _instance(rng, 6, monotone=True)
    budget = 0.5 * sum(energy)
    for method in (best_single, greedy, random_subset):
        r = method(Objective(fn), energy, budget)
        assert r.subset and r.energy <= budget + 1e-9 and r.evaluations >= 1
    assert best_single(Objective(fn), energy, budget).evaluations == sum(e <= budget for e in energy)
    assert exhaustive(Objective(fn), energy, 0.0).subset == ()  # nothing affordable


def _clustered_scores(seed: int, n: int = 160, experts: int = 4):
    """Prompts in ``experts`` clusters; expert e predicts cluster e's tokens well (synthetic logp)."""
    centres = torch.randn(experts, 16, generator=torch.Generator().manual_seed(99)) * 3
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, experts, (n,), generator=g)
    emb = centres[cluster] + torch.randn(n, 16, generator=g)
    good = torch.full((experts, n, 8), math.log(0.05), dtype=torch.float64)
    good[cluster, torch.arange(n)] = math.log(0.6)
    noise = 0.3 * torch.randn(experts, n, 8, generator=g, dtype=torch.float64)
    return emb, (good + noise).clamp_max(0.0)


def test_masking_matches_retraining_on_the_subset():
    # The paper's property: the gate trained once on all experts, masked to S, is as good as a
    # gate retrained on S. Report how close, on held-out windows.
    train, val = _clustered_scores(0), _clustered_scores(1)
    cfg = GateConfig(experts=["a", "b", "c", "d"], embedder="a", input_dim=16, hidden_dim=32)
    gate, losses = train_gate(cfg, *train, steps=150)
    assert losses[-1] < losses[0] - 0.3
    subsets = [(0, 1), (1, 2, 3), (0, 3)]
    gaps = masking_gap(gate, train, val, subsets, steps=100)
    for g in gaps:
        print(
            f"subset {g.subset}: masked {g.masked_nll:.4f} retrained {g.retrained_nll:.4f} gap {g.gap:+.4f}"
        )
        assert abs(g.gap) < 0.02, g  # nats/token, on NLLs of about 1.0-1.7
        assert abs(g.gap) / g.retrained_nll < 0.015


def test_config_round_trip_and_one_line_errors():
    cfg = MixtureConfig(
        experts=[ExpertProfile(name="a", path="m0", decode_s_per_token=0.01, energy_j_per_token=0.2)],
        latency_classes={"fast": LatencyClass(bound_s=1.0)},
        default_class="fast",
    )
    assert MixtureConfig.from_json(cfg.to_json()) == cfg
    bad = [
        ('{"experts": [{"name": "a", "path": "x", "energy_j_per_token": -1}]}', "experts[0]"),
        ('{"experts": [{"name": "a"}]}', "missing required field(s) ['path']"),
        ('{"experts": [{"name": "a", "path": "x"}], "latency_classes": {"f": {"bound_s": 0}}}', "bound_s"),
        ('{"experts": [{"name": "a", "path": "x"}], "default_class": "slow"}', "default_class"),
        ('{"experts": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}', "duplicate"),
        ('{"experts": [{"name": "a", "path": "x"}], "aggregation": "vote"}', "aggregation"),
        ('{"experts": [{"name": "a", "path": "x"}], "selected": ["b"]}', "selected"),
    ]
    for text, needle in bad:
        with pytest.raises(ValueError, match=None) as err:
            MixtureConfig.from_json(text)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="default_device"):
        HardwareProfile.from_json('{"devices": {"gpu": {"watts": 5}}}')
    hw = HardwareProfile.from_json(
        '{"devices": {"a": {"watts": 10}, "b": {"joules_per_token": 0.3}}, '
        '"assignment": {"x": "b"}, "default_device": "a"}'
    )
    assert hw.energy("x", 0.02) == ("b", 0.3) and hw.energy("y", 0.02) == ("a", pytest.approx(0.2))
    assert HardwareProfile.from_json(hw.to_json()) == hw
    assert ExpertProfile(
        name="a", path="p", overhead_s=0.1, prefill_s_per_token=0.01, decode_s_per_token=0.02
    ).latency_s(10, 5) == pytest.approx(0.3)


def test_bridge_with_the_same_tokenizer_reproduces_native_scoring():
    # Oracle: through the text bridge, an expert whose tokenizer is the mixture's own must score
    # canonical token windows exactly as the native path does (decode -> re-encode is the identity
    # there, and every own token ends in its own primary token).
    from moekit.data.tokenizer import train_tokenizer
    from moekit.mixture.bridge import TextBridge
    from moekit.mixture.gate import score_windows

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n" * 8
    tok = train_tokenizer([text], vocab_size=300)
    model = _tiny(32, 0)
    ids = tok.encode(text).ids[:40]
    windows = torch.tensor([ids])
    bridge = TextBridge(model, tok, tok, vocab_size=512)
    torch.testing.assert_close(bridge.score_windows(windows, 10), score_windows(model, windows, 10))


def test_bridge_with_another_tokenizer_gives_a_distribution_over_the_mixture_vocabulary():
    from moekit.data.tokenizer import train_tokenizer
    from moekit.mixture.bridge import BridgedSession, TextBridge

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n" * 8
    primary = train_tokenizer([text], vocab_size=300)
    other = train_tokenizer([text.upper() + text], vocab_size=280)
    assert other.to_str() != primary.to_str()
    bridge = TextBridge(_tiny(32, 1), other, primary, vocab_size=512, num_candidates=64)
    session = BridgedSession(bridge, primary.encode("def add(").ids)
    logp = session.prefill()
    assert logp.shape == (1, 512) and logp.dtype == torch.float64
    assert float(logp.exp().sum()) == pytest.approx(1.0)
    assert int((logp > -math.inf).sum()) >= 2  # several candidates mapped
    logp = session.step(logp.argmax(-1))
    assert float(logp.exp().sum()) == pytest.approx(1.0)
    # Scoring credits every own-token log-probability to some primary token: the totals agree.
    windows = torch.tensor([primary.encode(text).ids[:30]])
    credit = bridge.score_windows(windows, 1)
    enc = other.encode(primary.decode(windows[0].tolist()))
    own, first_end = enc.ids, len(primary.decode(windows[0, :1].tolist()))
    with torch.no_grad():
        lp = bridge.model(torch.tensor([own[:-1]])).logits[0].double().log_softmax(-1)
    token_lp = lp.gather(-1, torch.tensor(own[1:])[:, None])[:, 0]
    # The prompt (one primary token) keeps the own tokens that end inside it.
    total = sum(float(x) for x, (_, end) in zip(token_lp, enc.offsets[1:], strict=True) if end > first_end)
    assert float(credit.sum()) == pytest.approx(float(total), rel=1e-9)


def test_sampled_monotonicity_report():
    rng = random.Random(3)
    energy, monotone = _instance(rng, 14, monotone=True)
    report = monotonicity_report(Objective(monotone), 14, max_pairs=200, seed=1)
    assert (report.pairs, report.violations, report.sampled) == (200, 0, True)
    weights = [rng.random() for _ in range(8)]

    def bumpy(s):  # best at 3 experts: every addition past 3 costs 0.5 plus a little
        return -0.5 * max(0, len(s) - 3) + 0.01 * sum(weights[i] for i in s)

    full = monotonicity_report(Objective(bumpy), 8)
    sampled = monotonicity_report(Objective(bumpy), 8, max_pairs=300, seed=2)
    assert full.pairs == 8 * (2**7 - 1) and not full.sampled and full.violations > 0
    assert 0 < sampled.max_drop <= full.max_drop + 1e-12  # an estimate never exceeds the truth
