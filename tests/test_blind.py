"""moekit.blind: specs, making pairs, the sealed key, ratings files, the server API, judges, statistics."""

from __future__ import annotations

import json
import math
import random
import urllib.error
import urllib.request
from math import comb

import numpy as np
import pytest

from moekit.blind import (
    RatingsFileError,
    SystemSpec,
    judge_both_orders,
    judge_folder,
    make_blind,
    parse_spec,
    read_key,
    read_pairs,
    read_prompts,
    read_ratings,
    stats,
    unblinded_pairs,
    write_unblind,
)
from moekit.blind.ratings import Rating, append_rating, rater_file
from moekit.blind.spec import Prompt
from moekit.cli.main import main

NAMES = ("SYSALPHA", "SYSBRAVO", "SYSCHARLIE")


def fake_answer(spec, texts, cache):
    """Answers that carry the system's name, so the tests can check what the key says."""
    return [f"{spec.name} answers {t}" + ("!!" if spec.name == "SYSALPHA" else "") for t in texts]


def make_fake(tmp_path, num_prompts=12, systems=2, seed=5, name="blind"):
    specs = [SystemSpec(model=f"/m/{n.lower()}", name=n) for n in NAMES[:systems]]
    prompts = [Prompt(str(i), f"prompt number {i}") for i in range(num_prompts)]
    return make_blind(specs, prompts, tmp_path / name, seed=seed, answer=fake_answer)


# --- specs and prompts ---------------------------------------------------------------------------


def test_parse_spec_path_options_and_json(tmp_path):
    s = parse_spec("runs/x:decode=scmoe,scmoe_beta=0.7,scmoe_weak=rank:2,max_new_tokens=16,top_k=none")
    assert (s.model, s.decode_mode, s.scmoe_beta, s.scmoe_weak, s.max_new_tokens, s.top_k) == (
        "runs/x",
        "scmoe",
        0.7,
        "rank:2",
        16,
        None,
    )
    assert s.name == "x:decode=scmoe,max_new_tokens=16,scmoe_beta=0.7,scmoe_weak=rank:2"
    assert parse_spec("runs/x").decode_mode == "greedy" and parse_spec("runs/x").name == "x"
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"model": "runs/y", "temperature": 0.8, "name": "hot"}))
    assert parse_spec(str(f)) == SystemSpec(model="runs/y", temperature=0.8, name="hot")
    with pytest.raises(ValueError, match="unknown option 'beta=1'"):
        parse_spec("runs/x:beta=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_spec("runs/x:temperature=hot")
    with pytest.raises(ValueError, match="decode=sample needs temperature"):
        parse_spec("runs/x:decode=sample")


def test_read_prompts_text_and_jsonl(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("first\n\nsecond\n")
    assert [(p.id, p.text) for p in read_prompts(t)] == [("0", "first"), ("1", "second")]
    j = tmp_path / "p.jsonl"
    j.write_text('{"id": "q1", "prompt": "a"}\n{"instruction": "b"}\n')
    assert [(p.id, p.text) for p in read_prompts(j)] == [("q1", "a"), ("1", "b")]
    j.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"p.jsonl line 2: not valid JSON"):
        read_prompts(j)


# --- make and the key ----------------------------------------------------------------------------


def test_unblinding_recovers_the_true_mapping(tmp_path):
    out = make_fake(tmp_path, num_prompts=40)
    pairs = unblinded_pairs(out)
    assert len(pairs) == 40 and len({p.pair_id for p in pairs}) == 40
    for p in pairs:
        assert p.left.startswith(p.left_system + " answers " + p.prompt)
        assert p.right.startswith(p.right_system + " answers " + p.prompt)
    lefts = sum(p.left_system == "SYSALPHA" for p in pairs)
    assert 10 <= lefts <= 30  # sides drawn per pair, not fixed
    assert [p.prompt_id for p in pairs] != [str(i) for i in range(40)]  # order shuffled
    key, doc = read_key(out)
    assert set(doc["systems"]) == {"SYSALPHA", "SYSBRAVO"} and doc["seed"] == 5
    again = make_fake(tmp_path, num_prompts=40, name="again")
    assert (again / "pairs.jsonl").read_text() == (out / "pairs.jsonl").read_text()  # the seed reproduces


def test_the_shown_files_never_name_a_system(tmp_path):
    specs = [SystemSpec(model="/m/a", name="SECRETA"), SystemSpec(model="/m/b", name="SECRETB")]
    out = make_blind(
        specs,
        [Prompt("0", "hi"), Prompt("1", "yo")],
        tmp_path / "b",
        seed=1,
        answer=lambda s, t, c: [f"answer {i}" for i in range(len(t))],
    )
    for name in ("pairs.jsonl", "manifest.json"):
        assert "SECRET" not in (out / name).read_text()
    assert "SECRETA" in (out / "key.json").read_text()


def test_an_edited_key_breaks_the_seal(tmp_path):
    out = make_fake(tmp_path)
    doc = json.loads((out / "key.json").read_text())
    first = next(iter(doc["pairs"].values()))
    first["left"], first["right"] = first["right"], first["left"]
    (out / "key.json").write_text(json.dumps(doc, indent=1) + "\n")
    with pytest.raises(ValueError, match="does not match the seal"):
        read_key(out)
    with pytest.raises(ValueError, match="already holds"):
        make_blind(
            [SystemSpec(model="a", name="x"), SystemSpec(model="b", name="y")],
            [Prompt("0", "p")],
            out,
            answer=fake_answer,
        )


def test_three_systems_meet_pairwise(tmp_path):
    pairs = unblinded_pairs(make_fake(tmp_path, num_prompts=5, systems=3))
    assert len(pairs) == 15
    met = {frozenset((p.left_system, p.right_system)) for p in pairs}
    assert len(met) == 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A random moe-tiny folder with a tokenizer (4 experts, top-2: SCMoE's rank:3 exists)."""
    import torch

    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.models import MoEForCausalLM, get_preset

    text = (
        "def parse(text):\n    return [line.split() for line in text.splitlines()]\nclass A:\n    x = 1\n"
        * 40
    )
    tok = train_tokenizer([text], vocab_size=300)
    folder = tmp_path_factory.mktemp("blindrun") / "model"
    torch.manual_seed(0)
    MoEForCausalLM(get_preset("moe-tiny").replace(vocab_size=tok.get_vocab_size())).save_pretrained(folder)
    save_tokenizer(tok, folder)
    return folder


def test_make_with_a_real_model_matches_generate(tiny_run, tmp_path, capsys):
    """Greedy answers equal `moekit generate --temperature 0`; SCMoE runs through the same path."""
    import torch

    from moekit.blind.make import answer_prompts
    from moekit.infer.decoding import SelfContrastSession
    from moekit.loader import load_model_and_tokenizer
    from moekit.models.generation import generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("def \nclass \n")
    out = tmp_path / "b"
    rc = main(
        [
            "blind",
            "make",
            "--a",
            f"{tiny_run}:decode=scmoe,scmoe_weak=rank:3,max_new_tokens=6,name=sc",
            "--b",
            f"{tiny_run}:max_new_tokens=6,name=gr",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--seed",
            "3",
        ]
    )
    assert rc == 0 and "wrote 2 pairs" in capsys.readouterr().out
    loaded = load_model_and_tokenizer(tiny_run)
    by_system = {}
    for p in unblinded_pairs(out):
        by_system[(p.left_system, p.prompt)] = p.left
        by_system[(p.right_system, p.prompt)] = p.right
    for prompt in ("def ", "class "):
        ids = torch.tensor([loaded.tokenizer.encode(prompt).ids])
        want = generate(loaded.model, ids, max_new_tokens=6, eos_token_id=loaded.eos_token_id, compile=False)
        new = want[0, ids.shape[1] :].tolist()
        new = new[: new.index(loaded.eos_token_id)] if loaded.eos_token_id in new else new
        assert by_system[("gr", prompt)] == loaded.tokenizer.decode(new)
        src = SelfContrastSession(loaded.model, ids, max_new_tokens=6, weak="rank:3")
        sc = generate(
            loaded.model, ids, max_new_tokens=6, eos_token_id=loaded.eos_token_id, source=src, compile=False
        )
        new = sc[0, ids.shape[1] :].tolist()
        new = new[: new.index(loaded.eos_token_id)] if loaded.eos_token_id in new else new
        assert by_system[("sc", prompt)] == loaded.tokenizer.decode(new)
    dense = tmp_path / "dense"
    from moekit.models import MoEForCausalLM, get_preset

    MoEForCausalLM(
        get_preset("dense-small").replace(
            vocab_size=loaded.tokenizer.get_vocab_size(),
            num_layers=1,
            dim=32,
            ffn_dim=32,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
        )
    ).save_pretrained(dense)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_run / name).is_file():
            (dense / name).write_bytes((tiny_run / name).read_bytes())
    with pytest.raises(ValueError, match="decode=scmoe needs a model with MoE layers"):
        answer_prompts(SystemSpec(model=str(dense), decode="scmoe"), ["def "])
    spec = SystemSpec(model=str(tiny_run), temperature=1.0, max_new_tokens=5, seed=9)
    assert answer_prompts(spec, ["def "]) == answer_prompts(spec, ["def "])  # seeded sampling repeats


# --- ratings files -------------------------------------------------------------------------------


def test_corrupt_and_torn_ratings_file(tmp_path, capsys):
    out = make_fake(tmp_path, num_prompts=4)
    pairs = read_pairs(out)
    path = rater_file(out, "ann")
    for p in pairs[:2]:
        append_rating(path, Rating(rater="ann", pair_id=p.pair_id, choice="left"))
    with open(path, "a") as f:
        f.write("{not json\n")
    append_rating(path, Rating(rater="ann", pair_id=pairs[2].pair_id, choice="tie"))
    with open(path, "a") as f:
        f.write('{"rater": "ann", "pair_id": "' + pairs[3].pair_id + '", "cho')  # a crash mid-write
    with pytest.raises(RatingsFileError) as info:
        read_ratings(path)
    err = info.value
    assert str(err).startswith(f"{path} line 3: not valid JSON") and "\n" not in str(err)
    assert err.bad_lines == [3, 5] and "3 complete lines kept" in str(err)
    assert [r.pair_id for r in err.kept] == [p.pair_id for p in pairs[:3]]
    with open(tmp_path / "only_torn.jsonl", "w") as f:
        f.write('{"rater": "ann", "pair_id": "x", "choice": "left"}\n{"rater": "a')
    with pytest.raises(RatingsFileError, match=r"only_torn.jsonl line 2: cut off mid-line"):
        read_ratings(tmp_path / "only_torn.jsonl")
    bad_value = tmp_path / "bad_value.jsonl"
    bad_value.write_text('{"rater": "ann", "pair_id": "x", "score_left": 7}\n')
    with pytest.raises(RatingsFileError, match=r"bad_value.jsonl line 1: score_left must be an integer 1-5"):
        read_ratings(bad_value)
    assert main(["blind", "unblind", str(out)]) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and "ann.jsonl line 3" in stderr
    assert main(["blind", "unblind", str(out), "--skip-bad-lines"]) == 0
    summary = json.loads((out / "unblind" / "summary.json").read_text())
    assert summary["num_judgments"] == 3 and "warning" in capsys.readouterr().err
    assert path.read_text().count("\n") == 4  # nothing was dropped from the file
    from moekit.blind.server import RatingStore

    with pytest.raises(ValueError, match=r"ann.jsonl line 3: .*--skip-bad-lines"):
        RatingStore(out, "ann")
    store = RatingStore(out, "ann", skip_bad_lines=True)
    assert store.progress("ann")["num_done"] == 3
    store.rate({"rater": "ann", "index": 3, "pair_id": pairs[3].pair_id, "choice": "right"})
    with pytest.raises(RatingsFileError) as info:  # the torn line was ended; the new click is whole
        read_ratings(path)
    assert info.value.bad_lines == [3, 5] and info.value.kept[-1].choice == "right"


# --- the server API (the browser test drives the page itself) -------------------------------------


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def served(tmp_path):
    import threading

    from moekit.blind.server import RatingStore, make_server

    specs = [SystemSpec(model="/m/a", name="SECRETA"), SystemSpec(model="/m/b", name="SECRETB")]
    prompts = [Prompt(str(i), f"prompt {i}") for i in range(5)]
    out = make_blind(
        specs, prompts, tmp_path / "b", seed=2, answer=lambda s, t, c: [f"{x} -> {len(s.model)}" for x in t]
    )
    (out / "key.json").rename(tmp_path / "key-elsewhere.json")  # the server must not need the key
    server = make_server(RatingStore(out), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_saves_every_click_and_resumes(served):
    out, url = served
    assert "Blind comparison" in _get(url + "/")
    first = json.loads(_get(url + "/api/pair?rater=bob&index=0"))
    assert first["next_index"] == 0 and first["rating"] is None
    pid = first["pair"]["pair_id"]
    assert (
        _post(
            url + "/api/rate", {"rater": "bob", "index": 0, "pair_id": pid, "event": "score", "score_left": 4}
        )[0]
        == 200
    )
    status, prog = _post(
        url + "/api/rate", {"rater": "bob", "index": 0, "pair_id": pid, "choice": "right", "score_left": 4}
    )
    assert status == 200 and prog == {"num_pairs": 5, "num_done": 1, "next_index": 1}
    assert len(read_ratings(rater_file(out, "bob"))) == 2  # both clicks on disk when the answer came
    assert json.loads(_get(url + "/api/pair?rater=bob&index=0"))["rating"]["choice"] == "right"
    assert _post(url + "/api/rate", {"rater": "bob", "index": 1, "pair_id": pid, "choice": "left"})[0] == 400
    assert _post(url + "/api/rate", {"rater": "bob", "index": 0, "pair_id": pid, "choice": "best"})[0] == 400
    assert (
        _post(url + "/api/rate", {"rater": "../etc", "index": 0, "pair_id": pid, "choice": "left"})[0] == 400
    )
    assert json.loads(_get(url + "/api/state?rater=eve"))["next_index"] == 0  # raters are separate
    fetched = ""
    for i in range(5):  # what the page can fetch never names a system
        fetched += _get(url + f"/api/pair?rater=bob&index={i}")
    assert "SECRET" not in fetched + _get(url + "/") + _get(url + "/api/config")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        _get(url + "/key.json")


# --- judges --------------------------------------------------------------------------------------


def always_first(prompt, first, second):
    return "first"


def prefers_alpha(prompt, first, second):
    return ("first", 5, 1) if first.startswith("SYSALPHA") else ("second", 1, 5)


def test_function_judge_both_orders_cancel_position_bias(tmp_path, capsys):
    out = make_fake(tmp_path, num_prompts=6)
    assert judge_both_orders(always_first, "p", "x", "y")["choice"] == "tie"
    summary = judge_folder(out, always_first, "first-lover")
    assert summary["inconsistent"] == 6 and summary["choices"] == {"tie": 6}
    assert main(["blind", "judge", str(out), "--judge", "fn:tests.test_blind:prefers_alpha"]) == 0
    assert json.loads(capsys.readouterr().out)["inconsistent"] == 0
    assert main(["blind", "judge", str(out), "--judge", "fn:tests.test_blind:prefers_alpha"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 6  # a rerun resumes
    _, result = write_unblind([out], raters=["judge-fn-prefers_alpha"], make_plot=False)
    h = result["head_to_head"][0]
    assert (h["a"], h["wins"], h["losses"]) == ("SYSALPHA", 6, 0)
    assert h["wilcoxon"]["mean_a"] == 5 and h["wilcoxon"]["mean_b"] == 1
    assert main(["blind", "judge", str(out), "--judge", "fn:tests.test_blind:nope"]) == 2


def test_python_prefix_judge():
    from moekit.blind.judge import python_prefix_judge, valid_python_prefix

    assert valid_python_prefix("    def f(self):\n        if x:\n            y = (1,\n")  # unfinished, valid
    assert not valid_python_prefix("def f(x):\n    return x = = 2\n")
    assert valid_python_prefix("def f(x):\n    return x = = 2")  # a partial last line is not judged
    good, bad = "\n    return x\n", "\n    return x = = 2\n"
    assert python_prefix_judge("def f(x):", good, bad) == "first"
    assert python_prefix_judge("def f(x):", bad, good) == "second"
    assert python_prefix_judge("def f(x):", bad, bad) == "both_bad"
    assert judge_both_orders(python_prefix_judge, "def f(x):", good, good)["choice"] == "tie"


def test_loglik_judge_scores_mean_token_logprob(tiny_run):
    import torch

    from moekit.blind.judge import LoglikJudge

    judge = LoglikJudge(tiny_run)
    prompt, answer = "def foo", " = 1 # line"
    p_ids, a_ids = judge.tok.encode(prompt).ids, judge.tok.encode(answer).ids
    total = 0.0
    for t in range(len(a_ids)):  # one forward per answer token: slow and obviously right
        ctx = torch.tensor([p_ids + a_ids[:t]])
        with torch.no_grad():
            total += float(judge.model(ctx).logits[0, -1].double().log_softmax(-1)[a_ids[t]])
    assert judge.score(prompt, answer) == pytest.approx(total / len(a_ids), abs=1e-5)
    verdict, _, _, detail = judge(prompt, answer, " ???")
    assert verdict == ("first" if detail["loglik_first"] > detail["loglik_second"] else "second")


# --- statistics ----------------------------------------------------------------------------------


def test_win_rate_sign_test_and_wilson_by_hand():
    r = stats.win_rate(8, 2, 3)
    assert r["dropped"]["p"] == pytest.approx(2 * (comb(10, 8) + comb(10, 9) + 1) / 2**10)
    assert r["split"]["n"] == 12 and r["split"]["rate"] == 9 / 12  # 3 ties: one each side, one left out
    assert r["split"]["p"] == pytest.approx(2 * sum(comb(12, k) for k in range(9, 13)) / 2**12)
    z, k, n = 1.959963984540054, 8, 10
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (r["dropped"]["low"], r["dropped"]["high"]) == pytest.approx(
        (centre - half, centre + half), abs=1e-9
    )
    assert math.isnan(stats.win_rate(0, 0, 4)["dropped"]["p"])


def test_wilcoxon_matches_hand_ranks_and_scipy():
    from scipy.stats import wilcoxon

    a, b = [5, 4, 3, 5, 2, 4, 5], [3, 3, 3, 1, 4, 2, 3]
    r = stats.wilcoxon_scores(a, b)
    # nonzero differences 2, 1, 4, -2, 2, 2: |d| ranks 1 -> 1; 2 (x4) -> 3.5; 4 -> 6; W- = 3.5
    assert r["statistic"] == 3.5 and r["n_nonzero"] == 6
    assert r["p"] == pytest.approx(wilcoxon(a, b).pvalue)
    assert math.isnan(stats.wilcoxon_scores([3, 3], [3, 3])["p"])


def test_bradley_terry_matches_sklearn_and_the_two_system_formula():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    true = np.array([0.8, 0.0, -0.5, 0.3])
    outcomes = []
    for _ in range(300):
        i, j = rng.choice(4, 2, replace=False)
        p = 1 / (1 + math.exp(-(true[i] - true[j])))
        u = rng.random()
        outcomes.append((int(i), int(j), 0.5 if abs(u - p) < 0.05 else float(u < p)))
    winners, losers, weights = stats.battle_games(outcomes)
    theta = stats.bradley_terry(winners, losers, weights, 4, ridge=0.5)
    x = np.zeros((2 * len(winners), 4))
    y = np.zeros(2 * len(winners))
    for r, (w, lo) in enumerate(zip(winners, losers)):  # each game once as seen from each side
        x[2 * r, w], x[2 * r, lo], y[2 * r] = 1, -1, 1
        x[2 * r + 1, w], x[2 * r + 1, lo], y[2 * r + 1] = -1, 1, 0
    lr = LogisticRegression(C=1 / 0.5 / 2, fit_intercept=False, tol=1e-10, max_iter=10_000)
    lr.fit(x, y, sample_weight=np.repeat(weights, 2))
    np.testing.assert_allclose(theta, lr.coef_[0], atol=2e-5)
    two = stats.bradley_terry(*stats.battle_games([(0, 1, 1.0)] * 30 + [(0, 1, 0.0)] * 10), 2, ridge=1e-9)
    assert two[0] - two[1] == pytest.approx(math.log(3), abs=1e-4)
    assert stats.elo(two)[0] - stats.elo(two)[1] == pytest.approx(400 * math.log10(3), abs=0.05)
    boot = stats.bradley_terry_bootstrap(outcomes, 4, num_resamples=40)
    for e, lo, hi in zip(boot["elo"], boot["low"], boot["high"]):
        assert lo <= e <= hi


def test_agreement_cohen_by_hand_and_krippendorff_against_the_package():
    krippendorff = pytest.importorskip("krippendorff")
    assert stats.cohen_kappa(list("aabbt"), list("abbbt")) == pytest.approx((0.8 - 0.36) / 0.64)
    rng = random.Random(1)
    cats = ["A", "B", "tie", "both_bad"]
    units = [[rng.choice(cats) if rng.random() < 0.8 else None for _ in range(4)] for _ in range(30)]
    code = {c: i for i, c in enumerate(cats)}
    data = np.array([[np.nan if v is None else code[v] for v in row] for row in units]).T
    want = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    assert stats.krippendorff_alpha_nominal(units) == pytest.approx(want, abs=1e-12)
    assert stats.krippendorff_alpha_nominal([["a", "a"], ["b", "b"]]) == 1.0


def test_exact_power_by_hand():
    # n = 10, two-sided 5%: reject k in {0, 1, 9, 10} (p(k=1) = 22/1024; p(k=2) = 112/1024 > 0.05)
    p = 0.8
    want = sum(comb(10, k) * p**k * (1 - p) ** (10 - k) for k in (0, 1, 9, 10))
    assert stats.exact_sign_test_power(10, p) == pytest.approx(want)
    assert stats.exact_sign_test_power(10, 0.5) <= 0.05
    from scipy.stats import binom, binomtest

    for n in (1, 7, 24, 61):  # the vectorised rejection region is binomtest's, k by k
        region = [k for k in range(n + 1) if binomtest(k, n, 0.5).pvalue <= 0.05]
        assert stats.exact_sign_test_power(n, 0.63) == pytest.approx(
            sum(binom.pmf(k, n, 0.63) for k in region)
        )


# --- unblind end to end on fixed ratings ---------------------------------------------------------


def test_unblind_counts_biases_agreement_and_exports(tmp_path):
    out = make_fake(tmp_path, num_prompts=10)
    pairs = unblinded_pairs(out)
    # ann: alpha wins pairs 0-6, bravo 7, tie 8, both bad 9; cat agrees except pair 7 (a tie)
    for rater, verdicts in {
        "ann": ["SYSALPHA"] * 7 + ["SYSBRAVO", "tie", "both_bad"],
        "cat": ["SYSALPHA"] * 7 + ["tie", "tie", "both_bad"],
    }.items():
        for p, v in zip(pairs, verdicts):
            choice = "left" if v == p.left_system else "right" if v == p.right_system else v
            s_alpha, s_bravo = (4, 2) if v == "SYSALPHA" else (3, 3)
            sl, sr = (s_alpha, s_bravo) if p.left_system == "SYSALPHA" else (s_bravo, s_alpha)
            append_rating(
                rater_file(out, rater), Rating(rater=rater, pair_id=p.pair_id, event="score", score_left=sl)
            )
            append_rating(
                rater_file(out, rater),
                Rating(rater=rater, pair_id=p.pair_id, choice=choice, score_left=sl, score_right=sr),
            )
    dest, result = write_unblind([out])
    h = result["head_to_head"][0]
    # consensus: pair 7 is split (bravo vs tie) -> tie
    assert (h["wins"], h["losses"], h["ties"], h["both_bad"]) == (7, 0, 3, 1)
    assert h["dropped"]["p"] == pytest.approx(2 / 2**7)
    left_alpha = sum(p.left_system == "SYSALPHA" for p in pairs[:7])
    left_bravo = int(pairs[7].left_system == "SYSBRAVO")
    pb = result["position_bias"]
    assert (pb["decisive"], pb["left_wins"]) == (15, 2 * left_alpha + left_bravo)
    lb = result["length_bias"]  # alpha's answers are 2 characters longer ("!!")
    assert (lb["decisive_unequal"], lb["longer_wins"]) == (7, 7)
    ag = result["agreement"]
    assert ag["shared_pairs"] == 10 and ag["kappa"]["ann vs cat"]["n"] == 10
    assert ag["kappa"]["ann vs cat"]["kappa"] == pytest.approx(
        stats.cohen_kappa(["A"] * 7 + ["B", "t", "x"], ["A"] * 7 + ["t", "t", "x"])
    )
    battles = [json.loads(line) for line in (dest / "battles.jsonl").read_text().splitlines()]
    assert len(battles) == 20 and {b["winner"] for b in battles} == {
        "model_a",
        "model_b",
        "tie",
        "tie (bothbad)",
    }
    for b in battles:
        if b["winner"] == "model_a":
            assert b["model_a"] in ("SYSALPHA", "SYSBRAVO")
    alpaca = json.loads((dest / "alpaca_eval.json").read_text())
    assert alpaca["baseline"] == "SYSBRAVO" and {a["preference"] for a in alpaca["annotations"]} == {2.0, 1.5}
    board = alpaca["leaderboard"]["SYSALPHA"]
    assert board["win_rate"] == pytest.approx(100 * (7 + 1.5) / 10) and board["n_draws"] == 3
    assert "Head to head" in (dest / "report.md").read_text()
    assert (dest / "plot.png").stat().st_size > 2000
    json.loads(
        (dest / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json")
    )


def test_unblind_three_systems_gives_bradley_terry(tmp_path, capsys):
    out = make_fake(tmp_path, num_prompts=8, systems=3)
    rank = {"SYSALPHA": 0, "SYSBRAVO": 1, "SYSCHARLIE": 2}
    for p in unblinded_pairs(out):
        better = "left" if rank[p.left_system] < rank[p.right_system] else "right"
        append_rating(rater_file(out, "ann"), Rating(rater="ann", pair_id=p.pair_id, choice=better))
    assert main(["blind", "unblind", str(out), "--bootstrap", "15"]) == 0
    bt = json.loads((out / "unblind" / "summary.json").read_text())["bradley_terry"]
    assert bt["elo"][0] > bt["elo"][1] > bt["elo"][2]
    assert "Bradley-Terry" in (out / "unblind" / "report.md").read_text()
    assert "SYSALPHA vs SYSBRAVO: 8 wins" in capsys.readouterr().out


def test_unblind_pools_several_folders(tmp_path):
    """A-vs-B in one folder and B-vs-C in another: pooled, three systems get Bradley-Terry."""
    ab = make_fake(tmp_path, num_prompts=6, name="ab")
    specs = [SystemSpec(model="/m/b", name="SYSBRAVO"), SystemSpec(model="/m/c", name="SYSCHARLIE")]
    bc = make_blind(
        specs, [Prompt(str(i), f"q{i}") for i in range(6)], tmp_path / "bc", seed=3, answer=fake_answer
    )
    order = ["SYSALPHA", "SYSBRAVO", "SYSCHARLIE"]
    for folder in (ab, bc):
        for i, p in enumerate(unblinded_pairs(folder)):
            upset = i == 0  # one upset per folder keeps the strengths finite without leaning on the ridge
            better = order.index(p.left_system) < order.index(p.right_system)
            choice = "left" if better != upset else "right"
            append_rating(rater_file(folder, "ann"), Rating(rater="ann", pair_id=p.pair_id, choice=choice))
    _, result = write_unblind([ab, bc], out=tmp_path / "pooled", num_resamples=10, make_plot=False)
    assert result["systems"] == order and result["num_pairs"] == 12
    assert [(h["a"], h["b"], h["wins"], h["losses"]) for h in result["head_to_head"]] == [
        ("SYSALPHA", "SYSBRAVO", 5, 1),
        ("SYSBRAVO", "SYSCHARLIE", 5, 1),
    ]
    elo = result["bradley_terry"]["elo"]
    assert elo[0] > elo[1] > elo[2]
    assert elo[0] - elo[1] == pytest.approx(elo[1] - elo[2], abs=1.0)  # the same 5-1 record each step


def test_cli_help(capsys):
    for argv in (
        ["blind", "--help"],
        *(["blind", s, "--help"] for s in ("make", "rate", "unblind", "judge")),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "SPEC" in capsys.readouterr().out
