"""``moekit mixture profile|train|select|generate`` and ``moekit serve --mixture`` end to end, on tiny
models saved to folders."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli.main import main

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n" * 20
OTHER = "import os\nfor name in os.listdir('.'):\n    print(name.upper())\n" * 20


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory):
    """Three experts of different widths sharing one tokenizer, profiled, with a trained gate."""
    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.models import MoEForCausalLM
    from moekit.models.presets import moe_tiny

    root = tmp_path_factory.mktemp("mixture")
    tok = train_tokenizer([TEXT, OTHER], vocab_size=300)
    for i, dim in enumerate([32, 48, 64]):
        base = moe_tiny()
        torch.manual_seed(i)
        cfg = base.replace(dim=dim, head_dim=dim // 4, moe=base.moe.replace(dim=dim))
        MoEForCausalLM(cfg).save_pretrained(root / f"m{i}")
        save_tokenizer(tok, root / f"m{i}")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.py").write_text(TEXT)
    (root / "corpus" / "b.py").write_text(OTHER)
    (root / "hw.json").write_text(
        json.dumps(
            {
                "devices": {"low": {"watts": 5}, "big": {"joules_per_token": 0.9}},
                "default_device": "low",
                "assignment": {"m2": "big"},
            }
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["mixture", "profile", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1"]
        for i in range(3):
            args += ["--model", str(root / f"m{i}")]
        args += ["--names", "m0,m1,m2", "--hardware", str(root / "hw.json"), "--out", str(root / "mix.json")]
        args += ["--latency-class", "instant=0.000001:1", "--latency-class", "batch=100:3"]
        assert main(args) == 0
        assert (
            main(
                [
                    "mixture",
                    "train",
                    "--config",
                    str(root / "mix.json"),
                    "--out",
                    str(root / "gate"),
                    "--corpus",
                    str(root / "corpus"),
                    "--windows",
                    "16",
                    "--val-windows",
                    "8",
                    "--prompt-len",
                    "8",
                    "--cont-len",
                    "8",
                    "--steps",
                    "20",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    return root


def test_profile_writes_measured_latency_and_priced_energy(mixture_dir):
    from moekit.mixture import load_mixture_config

    cfg, _ = load_mixture_config(mixture_dir / "mix.json")
    assert cfg.names == ["m0", "m1", "m2"] and cfg.gate == "gate" and cfg.default_class == "instant"
    assert [e.path for e in cfg.experts] == ["m0", "m1", "m2"]  # relative to the config's folder
    for e in cfg.experts:
        assert e.prefill_s_per_token > 0 and e.decode_s_per_token > 0
    m0, m2 = cfg.expert("m0"), cfg.expert("m2")
    assert m0.device == "low" and m0.energy_j_per_token == pytest.approx(5 * m0.decode_s_per_token)
    assert m2.device == "big" and m2.energy_j_per_token == 0.9
    assert (mixture_dir / "gate" / "scores.safetensors").is_file()


def test_select_runs_every_method_and_writes_the_subset(mixture_dir, capsys):
    cfg_path = mixture_dir / "mix.json"
    budget = json.loads(cfg_path.read_text())["experts"][0]["energy_j_per_token"] + 0.95
    capsys.readouterr()
    assert (
        main(["mixture", "select", "--config", str(cfg_path), "--energy-budget", str(budget), "--json"]) == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) >= {
        "branch_and_bound",
        "exhaustive",
        "greedy_per_joule",
        "best_single",
        "random",
        "uniform_weights",
        "monotonicity",
    }
    for name, row in rows.items():
        if name != "monotonicity":
            assert row["energy_j_per_token"] <= budget + 1e-9 and row["experts"], name
    energy = [e["energy_j_per_token"] for e in json.loads(cfg_path.read_text())["experts"]]
    feasible = sum(
        sum(energy[i] for i in range(3) if mask >> i & 1) <= budget + 1e-12 for mask in range(1, 8)
    )
    assert rows["exhaustive"]["evaluations"] == feasible
    assert (
        rows["exhaustive"]["nll"]
        <= min(r["nll"] for k, r in rows.items() if k not in ("monotonicity",)) + 1e-9
    )
    assert (
        main(
            [
                "mixture",
                "select",
                "--config",
                str(cfg_path),
                "--energy-budget",
                str(budget),
                "--method",
                "exhaustive",
                "--write",
            ]
        )
        == 0
    )
    written = json.loads(cfg_path.read_text())
    assert (
        written["selected"] == rows["exhaustive"]["experts"]
        and written["energy_budget_j_per_token"] == budget
    )
    # The per-request level: a bound nothing meets falls back to the fastest selected expert.
    capsys.readouterr()
    assert (
        main(
            [
                "mixture",
                "generate",
                "--config",
                str(cfg_path),
                "--prompt",
                "def ",
                "--max-new-tokens",
                "4",
                "--latency-class",
                "instant",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    choice = json.loads(err.split("moekit mixture generate: ", 1)[1])
    assert len(choice["experts"]) == 1 and choice["bound_met"] is False
    assert choice["experts"][0] in written["selected"]
    assert (
        main(
            [
                "mixture",
                "generate",
                "--config",
                str(cfg_path),
                "--prompt",
                "def ",
                "--max-new-tokens",
                "4",
                "--latency-class",
                "batch",
            ]
        )
        == 0
    )
    choice = json.loads(capsys.readouterr().err.split("moekit mixture generate: ", 1)[1])
    assert sorted(choice["experts"]) == sorted(written["selected"]) and choice["bound_met"] is True
    assert sum(choice["weights"]) == pytest.approx(1.0)


def test_bad_config_is_a_one_line_error(mixture_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    data = json.loads((mixture_dir / "mix.json").read_text())
    data["experts"][1]["decode_s_per_token"] = -0.5
    bad.write_text(json.dumps(data))
    assert main(["mixture", "generate", "--config", str(bad), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "experts[1]" in err and "decode_s_per_token" in err
    bad.write_text("{not json")
    assert main(["mixture", "select", "--config", str(bad), "--energy-budget", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not valid JSON" in err
    hw = tmp_path / "hw.json"
    hw.write_text('{"devices": {"x": {"watts": -3}}, "default_device": "x"}')
    assert (
        main(
            [
                "mixture",
                "profile",
                "--model",
                str(mixture_dir / "m0"),
                "--hardware",
                str(hw),
                "--out",
                str(tmp_path / "o.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "watts" in err


def test_every_subverb_has_help(capsys):
    for verb in ("profile", "train", "select", "generate"):
        with pytest.raises(SystemExit) as code:
            main(["mixture", verb, "--help"])
        assert code.value.code == 0
        assert "--config" in capsys.readouterr().out or verb == "profile"


def test_serve_mixture_answers_and_reports_experts(mixture_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from moekit.cli._mixture_serve import build_mixture_app
    from moekit.cli.main import build_parser

    args = build_parser().parse_args(
        ["serve", "--mixture", str(mixture_dir / "mix.json"), "--model-name", "mix"]
    )
    app, name = build_mixture_app(args)
    assert name == "mix"
    with TestClient(app) as client:
        body = {"model": "mix", "prompt": "def ", "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/completions", json=body, headers={"X-Latency-Class": "batch"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["mixture"]["latency_class"] == "batch" and out["mixture"]["experts"]
        assert out["usage"]["completion_tokens"] >= 1
        # The default class ("instant") fits nothing: one expert, bound missed, and it says so.
        r = client.post(
            "/v1/chat/completions",
            json={"model": "mix", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert r.status_code == 200 and len(r.json()["mixture"]["experts"]) == 1
        assert r.json()["mixture"]["bound_met"] is False
        r = client.post("/v1/completions", json=body | {"logprobs": 2}, headers={"X-Latency-Class": "batch"})
        lp = r.json()["choices"][0]["logprobs"]
        assert r.status_code == 200 and len(lp["token_logprobs"]) == r.json()["usage"]["completion_tokens"]
        assert all(x <= 0 for x in lp["token_logprobs"])  # the mixture's log-probabilities
        r = client.post("/v1/completions", json=body | {"echo": True, "logprobs": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
        r = client.post("/v1/completions", json=body, headers={"X-Latency-Class": "nope"})
        assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json=body | {"stream": True}, headers={"X-Latency-Class": "batch"})
        first = json.loads(r.text.split("data: ", 2)[1])
        assert first["mixture"]["experts"] == out["mixture"]["experts"]
        health = client.get("/health").json()
        used = health["mixture"]["requests_per_expert"]
        assert sum(used.values()) >= 2 * len(out["mixture"]["experts"]) + 1
        assert health["mixture"]["experts"] == ["m0", "m1", "m2"]


def test_an_expert_with_another_tokenizer_joins_through_the_text_bridge(mixture_dir, tmp_path):
    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.mixture import Mixture
    from moekit.mixture.bridge import TextBridge
    from moekit.models import MoEForCausalLM
    from moekit.models.presets import moe_tiny

    torch.manual_seed(5)
    MoEForCausalLM(moe_tiny()).save_pretrained(tmp_path / "other")
    save_tokenizer(train_tokenizer([OTHER.upper() + TEXT], vocab_size=280), tmp_path / "other")
    cfg = {
        "experts": [
            {"name": "m0", "path": str(mixture_dir / "m0")},
            {"name": "o", "path": str(tmp_path / "other")},
        ]
    }
    (tmp_path / "mix.json").write_text(json.dumps(cfg))
    mixture = Mixture.load(tmp_path / "mix.json")
    assert isinstance(mixture.models["o"], TextBridge) and not isinstance(mixture.models["m0"], TextBridge)
    text, choice = mixture.generate("def ", max_new_tokens=3)
    assert choice.experts == ["m0", "o"] and choice.bridged == ["o"]  # uniform weights: both run
    assert choice.weights == pytest.approx([0.5, 0.5]) and isinstance(text, str)


def test_choose_orders_by_gate_weight_and_best_aggregation_keeps_one(mixture_dir):
    from moekit.mixture import Mixture

    mixture = Mixture.load(mixture_dir / "mix.json")
    mixture.config = mixture.config.replace(selected=None)
    ids = mixture.encode("def add(a, b):")
    choice = mixture.choose(ids, 4, "batch")
    weights = mixture.gate_logits(ids).softmax(-1)
    order = sorted(range(3), key=lambda i: -float(weights[i]))
    assert choice.experts == [mixture.config.names[i] for i in order]  # top_k=3: all, by weight
    assert choice.weights == pytest.approx([float(weights[i]) for i in order])
    mixture.config = mixture.config.replace(aggregation="best")
    best = mixture.choose(ids, 4, "batch")
    assert best.experts == choice.experts[:1] and best.weights == [1.0]


def test_damaged_gate_and_scores_are_one_line_errors(mixture_dir, tmp_path, capsys):
    import shutil

    gate = tmp_path / "gate"
    shutil.copytree(mixture_dir / "gate", gate)
    (gate / "gate.safetensors").write_bytes(b"\x00" * 12)
    cfg = json.loads((mixture_dir / "mix.json").read_text())
    cfg["gate"] = str(gate)
    cfg["experts"] = [e | {"path": str(mixture_dir / e["path"])} for e in cfg["experts"]]
    (tmp_path / "mix.json").write_text(json.dumps(cfg))
    assert main(["mixture", "select", "--config", str(tmp_path / "mix.json"), "--energy-budget", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gate.safetensors" in err
    shutil.copy(mixture_dir / "gate" / "gate.safetensors", gate / "gate.safetensors")
    (gate / "scores.safetensors").write_bytes(b"junk")
    assert main(["mixture", "select", "--config", str(tmp_path / "mix.json"), "--energy-budget", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scores.safetensors" in err
