"""moekit.train.distill: the KD and preference losses (by hand, against trl, finite differences), the
frozen teacher, the top-k cache, exact resume through fit, and `moekit distill` end to end."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from moekit.data import BatchListDataModule
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.train import LoopConfig, fit, seed_everything
from moekit.train.distill import (
    DistillDataModule,
    DistillObjective,
    TeacherLogitCache,
    TopKLogits,
    completion_logps,
    kd_loss,
    preference_loss,
    sequence_logps,
)
from tests.test_train import TINY_MODEL, _write_corpus

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _logits(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2


# ---- kd_loss -------------------------------------------------------------------------------------


def test_kd_loss_hand_computed_two_token_vocabulary():
    # p_T = (0.75, 0.25), p_S = (0.5, 0.5) at T = 1 (logits are log-probabilities).
    t = torch.tensor([[math.log(0.75), math.log(0.25)]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    m = (0.625, 0.375)  # 0.5 p_T + 0.5 p_S
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    assert float(kd_loss(s, t, kind="forward_kl")) == pytest.approx(fkl, abs=1e-12)
    assert float(kd_loss(s, t, kind="reverse_kl")) == pytest.approx(rkl, abs=1e-12)
    assert float(kd_loss(s, t, kind="jsd", beta=0.5)) == pytest.approx(jsd, abs=1e-12)
    # beta 0 / 1 are the two KLs; the T^2 factor and the temperature inside the softmax:
    assert float(kd_loss(s, t, kind="jsd", beta=0.0)) == pytest.approx(fkl, abs=1e-12)
    assert float(kd_loss(s, t, kind="jsd", beta=1.0)) == pytest.approx(rkl, abs=1e-12)
    pt2 = torch.softmax(t / 2, -1)[0].tolist()
    fkl_t2 = sum(p * math.log(p / 0.5) for p in pt2) * 4
    assert float(kd_loss(s, t, temperature=2.0)) == pytest.approx(fkl_t2, abs=1e-12)


def test_kd_loss_mask_averages_unmasked_tokens_only():
    s, t = _logits(2, 3, 5, seed=1), _logits(2, 3, 5, seed=2)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    for kind in KINDS:
        full = kd_loss(s[mask], t[mask], 1.5, kind)  # [3, V]: only the kept tokens
        assert torch.allclose(kd_loss(s, t, 1.5, kind, mask=mask), full, atol=1e-12)
    assert float(kd_loss(s, t, mask=torch.zeros(2, 3, dtype=torch.bool))) == 0.0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_identical_logits_is_zero(kind, temperature):
    x = _logits(3, 4, 7, seed=3)
    assert abs(float(kd_loss(x, x.clone(), temperature, kind))) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_gradient_matches_finite_differences(kind):
    s = _logits(2, 3, 5, seed=4).requires_grad_(True)
    t = _logits(2, 3, 5, seed=5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, 2.0, kind, 0.3, mask), (s,), eps=1e-6, atol=1e-7)
    # at identical logits the gradient is zero too (a minimum)
    x = t.clone().requires_grad_(True)
    kd_loss(x, t, 2.0, kind, 0.3).backward()
    assert float(x.grad.abs().max()) < 1e-12


def test_kd_loss_refuses_bad_input():
    x = _logits(2, 4)
    with pytest.raises(ValueError, match="kind"):
        kd_loss(x, x, kind="tvd")
    with pytest.raises(ValueError, match="share the vocabulary"):
        kd_loss(x, _logits(2, 5))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(x, x, temperature=0)


# ---- against trl ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl", reason="trl is the test-only reference (pip install 'moekit[dev]')")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_matches_trl_generalized_jsd(trl, beta, temperature):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    s, t = _logits(2, 4, 11, seed=6), _logits(2, 4, 11, seed=7)
    labels = torch.tensor([[5, -100, 3, 2], [-100, 1, 1, -100]])
    ref = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    ours = kd_loss(s, t, temperature, "jsd", beta, mask=labels != -100) / temperature**2
    assert torch.allclose(ours, ref.to(ours.dtype), atol=1e-12)


def _trl_dpo_loss(pc, pr, rc, rr, beta):
    """trl's DPOTrainer loss on given log-probabilities (a stub model returns them as per-token log-probs)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n, seq = pc.shape[0], 3
    log_probs = torch.zeros(2 * n, seq - 1, dtype=pc.dtype)
    log_probs[:, 0] = torch.cat([pc, pr])
    zeros = torch.zeros(2 * n, seq - 1)
    outputs = SimpleNamespace(
        log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=zeros.sum()
    )
    model = SimpleNamespace(training=True)
    model_call = SimpleNamespace(**vars(model))
    stub = SimpleNamespace(
        model=model_call, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    ones = torch.ones(2 * n, seq, dtype=torch.long)
    inputs = {"input_ids": ones * 0, "attention_mask": ones, "completion_mask": ones,
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}  # fmt: skip
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    return loss, stub._metrics["train"]


def test_preference_sigmoid_matches_trl_dpo(trl):
    g = torch.Generator().manual_seed(8)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    loss, c_rew, r_rew = preference_loss(pc, pr, rc, rr, beta=0.2, loss_type="sigmoid")
    ref, metrics = _trl_dpo_loss(pc, pr, rc, rr, 0.2)
    assert torch.allclose(loss, ref, atol=1e-12)
    assert float(c_rew.mean()) == pytest.approx(metrics["rewards/chosen"][0], abs=1e-12)
    assert float((c_rew - r_rew).mean()) == pytest.approx(metrics["rewards/margins"][0], abs=1e-12)


def test_preference_loss_hand_computed():
    pc, pr = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-3.0, -1.0], dtype=torch.float64)
    rc, rr = torch.tensor([-2.0, -2.0], dtype=torch.float64), torch.tensor([-2.0, -2.0], dtype=torch.float64)
    b = 0.5
    # log-ratios: chosen (1, 0), rejected (-1, 1)
    dpo = (-math.log(1 / (1 + math.exp(-b * 2))) - math.log(1 / (1 + math.exp(-b * -1)))) / 2
    loss, c_rew, r_rew = preference_loss(pc, pr, rc, rr, b, "sigmoid")
    assert float(loss) == pytest.approx(dpo, abs=1e-12)
    assert c_rew.tolist() == [0.5, 0.0] and r_rew.tolist() == [-0.5, 0.5]
    # kto_pair (trl <= 0.8's formula, LLaVA-MoD's default): KL_c = max(mean(1, 0), 0) = 0.5,
    # KL_r = max(mean(-1, 1), 0) = 0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = [1 - sig(b * (1 - 0)), 1 - sig(b * (0 - 0)), 1 - sig(b * (0.5 + 1)), 1 - sig(b * (0.5 - 1))]
    assert float(preference_loss(pc, pr, rc, rr, b, "kto_pair")[0]) == pytest.approx(
        sum(terms) / 4, abs=1e-12
    )
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(pc, pr, rc, rr, b, "ipo")


def test_completion_logps_masks_prompt_and_padding_and_matches_trl(trl):
    from trl.trainer.utils import selective_log_softmax

    logits = _logits(2, 6, 9, seed=9)
    ids = torch.randint(0, 9, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    lengths = torch.tensor([2, 3])
    lp = torch.log_softmax(logits, -1)
    by_hand = [sum(float(lp[0, t - 1, ids[0, t]]) for t in range(2, 6)), float(lp[1, 2, ids[1, 3]])]
    ours = completion_logps(logits, ids, mask, lengths)
    assert ours.tolist() == pytest.approx(by_hand, abs=1e-12)
    per_token = selective_log_softmax(logits[:, :-1], ids[:, 1:])
    keep = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 0, 0]])
    assert torch.allclose(ours, (per_token * keep).sum(-1), atol=1e-12)


# ---- tiny models ---------------------------------------------------------------------------------


def _tiny(seed, **over):
    torch.manual_seed(seed)
    return MoEForCausalLM(ModelConfig.from_dict({**TINY_MODEL, "vocab_size": 64, **over}))


def _token_batches(n, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 9), generator=g) for _ in range(n)]


def test_sequence_logps_is_completion_logps_of_the_model():
    model = _tiny(0).eval()
    ids = _token_batches(1)[0]
    mask, lengths = torch.ones_like(ids), torch.tensor([3, 5])
    with torch.no_grad():
        ref = completion_logps(model(ids).logits, ids, mask, lengths)
        assert torch.allclose(sequence_logps(model, ids, mask, lengths), ref)


def test_teacher_is_frozen_and_never_changes():
    teacher, student = _tiny(1), _tiny(2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = DistillObjective(teacher, "jsd", temperature=2.0, kd_weight=1.0)
    data = DistillDataModule(BatchListDataModule(_token_batches(3)))
    loop = LoopConfig(max_steps=4, lr=1e-2, eval_interval=100, save_interval=100, log_interval=1)
    result = fit(student, objective, data, loop, None, progress=False)
    assert result.step == 4
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the student did learn through the KD term: its gradient flows, the teacher's never does
    assert any(
        not torch.equal(a, b) for a, b in zip(_tiny(2).parameters(), student.parameters(), strict=True)
    )


def test_staged_kd_stops_the_teacher_at_kd_stop_step():
    teacher, student = _tiny(1), _tiny(2)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    objective = DistillObjective(teacher, kd_stop_step=2)
    data = DistillDataModule(BatchListDataModule(_token_batches(3)), grad_accum=2)
    loop = LoopConfig(max_steps=4, grad_accum=2, eval_interval=100, save_interval=100, log_interval=1)
    fit(student, objective, data, loop, None, progress=False)
    assert len(calls) == 4  # steps 0 and 1, two micro-batches each; none from step 2 on
    out = objective(student.train(), data.next_train_batch())
    assert float(out.metrics["kd_active"]) == 0.0 and float(out.metrics["kd_loss"]) == 0.0


def test_top_k_with_the_whole_vocabulary_equals_the_dense_teacher():
    t = _logits(2, 3, 10, seed=10)
    s = _logits(2, 3, 10, seed=11)
    full = TopKLogits.from_logits(t, 10, 2.0).as_logits()
    for kind in KINDS:
        assert torch.allclose(kd_loss(s, full, 2.0, kind), kd_loss(s, t, 2.0, kind), atol=1e-10)
    # with K < V the kept tokens keep their exact probabilities and the rest shares the remainder
    top = TopKLogits.from_logits(t, 3, 2.0)
    p = torch.softmax(top.as_logits() / 2.0, -1)
    assert torch.allclose(
        p.gather(-1, top.indices), torch.softmax(t / 2.0, -1).gather(-1, top.indices), atol=1e-6
    )
    assert torch.allclose(p.sum(-1), torch.ones(2, 3, dtype=p.dtype), atol=1e-6)


def test_cached_top_k_logits_equal_the_live_teachers(tmp_path):
    teacher = _tiny(1).eval()
    data = DistillDataModule(BatchListDataModule(_token_batches(3)))
    data.next_train_batch()  # the cache starts wherever the data module is, and puts it back
    cache = TeacherLogitCache.build(teacher, data, 4, k=5, temperature=2.0, path=tmp_path / "c.safetensors")
    assert data.num_drawn == 1
    cache = TeacherLogitCache.load(tmp_path / "c.safetensors")
    assert cache.matches(5, 2.0, 4) and not cache.matches(6, 2.0, 4)
    live = DistillObjective(teacher, temperature=2.0, top_k_logits=5)
    cached = DistillObjective(teacher, temperature=2.0, top_k_logits=5, cache=cache)
    for i in range(4):
        batch = data.next_train_batch()
        got = cache.lookup(i, batch["tokens"])
        with torch.no_grad():
            ref = TopKLogits.from_logits(teacher(batch["tokens"][:, :-1]).logits, 5, 2.0)
        assert torch.equal(got.values, ref.values) and torch.equal(got.indices, ref.indices)
        assert torch.equal(got.log_z, ref.log_z)
        assert torch.equal(cached.teacher_logits(batch["tokens"], i), live.teacher_logits(batch["tokens"]))
    with pytest.raises(ValueError, match="other tokens"):
        cache.lookup(0, _token_batches(1, seed=99)[0])


class _InterruptAt(DistillObjective):
    """Raises KeyboardInterrupt (as Ctrl-C would) when batch ``index`` is drawn."""

    def __init__(self, *args, index=None, **kw):
        super().__init__(*args, **kw)
        self.interrupt_index = index

    def forward(self, model, batch, moe_k=None):
        if int(batch["index"]) == self.interrupt_index:
            raise KeyboardInterrupt
        return super().forward(model, batch, moe_k)


def test_resume_mid_distillation_is_exact(tmp_path, capsys):
    def run(out, resume=False, index=None):
        seed_everything(0)
        teacher, student = _tiny(1), _tiny(2, moe={**TINY_MODEL["moe"], "noise": "jitter"})
        data = DistillDataModule(
            BatchListDataModule(_token_batches(5), _token_batches(1, seed=7)), grad_accum=2
        )
        objective = _InterruptAt(teacher, "jsd", 2.0, 0.5, kd_stop_step=3, top_k_logits=8, index=index)
        loop = LoopConfig(
            max_steps=6, grad_accum=2, eval_interval=2, save_interval=100, log_interval=1, lr=1e-2
        )
        res = fit(student, objective, data, loop, out, resume=resume, progress=False)
        return res, student

    full, s_full = run(tmp_path / "a")
    cut, _ = run(tmp_path / "b", index=4)  # Ctrl-C in step 2 (KD on); the resume crosses the KD stop at 3
    assert cut.stop_reason == "interrupted" and cut.step == 2
    part, s_part = run(tmp_path / "b", resume=True)
    assert part.losses == full.losses[2:] and part.history == full.history
    assert all(
        torch.equal(a, b)
        for a, b in zip(s_full.state_dict().values(), s_part.state_dict().values(), strict=True)
    )


# ---- the recipes and the CLI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny teacher trained for a few steps (its run folder holds the tokenizer)."""
    from moekit.train import train
    from tests.test_train import _config

    tmp = tmp_path_factory.mktemp("distill")
    corpus = _write_corpus(tmp / "corpus")
    model = {**TINY_MODEL, "num_layers": 3}
    train(
        _config(tmp, corpus, max_steps=6, model_overrides=model, out_dir=str(tmp / "teacher")), progress=False
    )
    return tmp, corpus


def _cli(tmp, corpus, *extra):
    from moekit.cli.main import main

    args = ["distill", "--teacher", str(tmp / "teacher"), "--corpus", str(corpus), "--seq-len", "32",
            "--batch-size", "4", *extra]  # fmt: skip
    return main(args)


def test_cli_mimic_end_to_end_and_resume(teacher_run, tmp_path, capsys):
    tmp, corpus = teacher_run
    over = json.dumps({"num_layers": 1})
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"teacher": str(tmp / "teacher"), "student_overrides": json.loads(over),
                               "cache_dir": str(tmp / "cache"), "max_corpus_bytes": None, "val_fraction": 0.2,
                               "eval_interval": 2, "save_interval": 2, "log_interval": 1, "eval_steps": 2,
                               "warmup_steps": 1}))  # fmt: skip
    out = tmp_path / "mimic"
    rc = _cli(tmp, corpus, "--config", str(cfg), "--student-preset", "moe-tiny", "--kd-kind", "jsd",
              "--temperature", "2", "--steps", "4", "--top-k-logits", "16", "--cache-teacher", "--out", str(out))  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "top-1 agreement" in text
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["step"] == 4 and summary["kd"]["cached"] and summary["kd"]["kd_kind"] == "jsd"
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records][0] == "start" and records[-1]["event"] == "end"
    assert all(r["kd_active"] == 1.0 and r["kd_loss"] > 0 for r in records if r["event"] == "train")
    # a normal run folder: the loader opens it, `moekit eval` runs on it
    from moekit.cli.main import main
    from moekit.loader import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(out)
    assert loaded.model.config.num_layers == 1 and loaded.model.config.vocab_size == TINY_MODEL["vocab_size"]
    assert main(["eval", "--model", str(out)]) == 0
    capsys.readouterr()
    # resume to more steps continues the same run
    rc = _cli(tmp, corpus, "--resume", "--steps", "6", "--out", str(out))
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "distill_summary.json").read_text())["step"] == 6


def test_cli_mos_builds_a_shallower_pr_moe_with_staged_kd(teacher_run, tmp_path, capsys):
    tmp, corpus = teacher_run
    out = tmp_path / "mos"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"teacher": str(tmp / "teacher"), "cache_dir": str(tmp / "cache"),
                               "max_corpus_bytes": None, "val_fraction": 0.2, "eval_interval": 4,
                               "log_interval": 1, "eval_steps": 1, "warmup_steps": 1}))  # fmt: skip
    rc = _cli(tmp, corpus, "--config", str(cfg), "--student-preset", "moe-tiny", "--recipe", "mos",
              "--steps", "4", "--out", str(out))  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    from moekit.loader import from_pretrained

    student = from_pretrained(out)
    teacher = from_pretrained(tmp / "teacher")
    assert student.config.num_layers < teacher.config.num_layers
    assert (
        student.config.moe.residual_moe
        and student.config.experts_per_layer[-1] == 2 * student.config.moe.num_experts
    )
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    active = [r["kd_active"] for r in records if r["event"] == "train"]
    assert active == [1.0, 1.0, 0.0, 0.0]  # kd_stop_step defaults to half the steps


def test_cli_preference_reports_margins_and_rate(teacher_run, tmp_path, capsys):
    tmp, corpus = teacher_run
    out = tmp_path / "pref"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"teacher": str(tmp / "teacher"), "cache_dir": str(tmp / "cache"),
                               "max_corpus_bytes": None, "val_fraction": 0.2, "eval_interval": 3,
                               "log_interval": 1, "prompt_len": 6, "response_len": 4, "warmup_steps": 0,
                               "lr": 1e-3}))  # fmt: skip
    rc = _cli(tmp, corpus, "--config", str(cfg), "--student", str(tmp / "teacher"), "--recipe", "preference",
              "--num-prompts", "8", "--num-samples", "3", "--pref-loss", "sigmoid", "--steps", "3",
              "--out", str(out))  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "preference rate" in capsys.readouterr().out
    s = json.loads((out / "distill_summary.json").read_text())
    assert s["num_pairs"] == 8 and 0.0 <= s["teacher_judged"]["preference_rate"] <= 1.0
    # the student starts as the teacher (the reference), so before training every reward is 0
    assert (
        abs(s["before"]["reward_margin"]) < 1e-4
        and s["after"]["reward_margin"] != s["before"]["reward_margin"]
    )
    train = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("reward_margin" in r and "pref_loss" in r for r in train if r["event"] == "train")


def test_cli_vocabulary_mismatch_is_one_clear_line(teacher_run, tmp_path, capsys):
    tmp, corpus = teacher_run
    other = _tiny(3, vocab_size=TINY_MODEL["vocab_size"] + 8)
    other.save_pretrained(tmp_path / "other")
    rc = _cli(tmp, corpus, "--student", str(tmp_path / "other"), "--steps", "1", "--out", str(tmp_path / "x"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("moekit distill: error: vocabulary mismatch: the teacher has 320 tokens")


def test_routing_overlap_of_a_model_with_itself_and_with_a_dense_teacher():
    from moekit.train.distill_recipes import routing_overlap

    model = _tiny(4).eval()
    batches = _token_batches(2)
    same = routing_overlap(model, model, batches)
    assert len(same) == 2 and all(r["nmi"] == pytest.approx(1.0) and r["same_top1"] == 1.0 for r in same)
    assert all(r["topk_overlap"] == 1.0 and r["teacher_layer"] == r["student_layer"] for r in same)
    other = routing_overlap(model, _tiny(5).eval(), batches)
    assert all(0.0 <= r["nmi"] < 1.0 for r in other)
    dense = _tiny(6, moe=None, moe_placement="none").eval()
    assert routing_overlap(model, dense, batches) == []


def test_cli_mimic_into_a_student_upcycled_from_a_smaller_dense_model(teacher_run, tmp_path, capsys):
    tmp, corpus = teacher_run
    dense = _tiny(7, vocab_size=TINY_MODEL["vocab_size"], moe=None, moe_placement="none", num_layers=2)
    dense.save_pretrained(tmp_path / "dense")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"teacher": str(tmp / "teacher"), "cache_dir": str(tmp / "cache"),
                               "max_corpus_bytes": None, "val_fraction": 0.2, "eval_interval": 2,
                               "log_interval": 1, "eval_steps": 1, "warmup_steps": 0}))  # fmt: skip
    out = tmp_path / "up"
    rc = _cli(tmp, corpus, "--config", str(cfg), "--student", str(tmp_path / "dense"), "--upcycle-experts", "4",
              "--steps", "2", "--out", str(out))  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    from moekit.loader import from_pretrained

    student = from_pretrained(out)
    assert student.config.moe_layer_ids == [1] and student.config.moe.num_experts == 4
    # the resume rebuilds the same upcycled student from distill_config.json
    assert _cli(tmp, corpus, "--resume", "--steps", "3", "--out", str(out)) == 0, capsys.readouterr().err
    assert json.loads((out / "distill_summary.json").read_text())["step"] == 3
