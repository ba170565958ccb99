"""moekit.train.fit: the generic loop on a non-LM model, gradient accumulation, model parameter groups."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.data import BatchListDataModule, DataModule
from moekit.layers import MoEConfig, MoELayer
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.models.objectives import CausalLMObjective, LossWeights, Objective, ObjectiveOutput
from moekit.train import KSchedule, LoopConfig, fit, load_checkpoint, seed_everything
from moekit.train.freeze import FREEZE_GROUPS, apply_freeze

# ---- a family that is not a language model -----------------------------------------------------


class ToyRegressor(nn.Module):
    """x [B, 4] -> linear -> LayerNorm -> residual MoE (jitter noise: the global RNG matters) -> y [B]."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.norm = nn.LayerNorm(dim)
        self.moe = MoELayer(MoEConfig(dim=dim, ffn_dim=16, num_experts=4, top_k=2, noise="jitter"))
        self.head = nn.Linear(dim, 1)

    def forward(self, x_B4, moe_k=None):
        h_BD = self.norm(self.inp(x_B4))
        out = self.moe(h_BD, k=moe_k)
        return self.head(h_BD + out.hidden).squeeze(-1), out


class RegressionObjective(Objective):
    """MSE plus the weighted MoE aux losses; logs ``mse``."""

    def __init__(self, weights: LossWeights) -> None:
        self.weights = weights

    def forward(self, model, batch, moe_k=None):
        return model(batch[0], moe_k=moe_k)

    def loss(self, output, batch):
        pred_B, moe_out = output
        mse = F.mse_loss(pred_B, batch[1])
        aux = self.weights.weighted(moe_out.aux_losses, mse)
        return ObjectiveOutput(mse + aux, {"mse": mse}, moe_out.aux_losses, [moe_out.routing])

    def eval_loss(self, output, batch):
        return F.mse_loss(output[0], batch[1]), len(batch[1])


class SineData(DataModule):
    """y = sin(x @ w): random training batches from its own generator, fixed validation batches."""

    def __init__(self, seed: int, batch_size: int = 16) -> None:
        self.batch_size = batch_size
        self.w = torch.linspace(-1.0, 1.0, 4)
        self.generator = torch.Generator().manual_seed(seed)
        self.num_batches = 0
        val_gen = torch.Generator().manual_seed(1234)
        xs = [torch.randn(batch_size, 4, generator=val_gen) for _ in range(2)]
        self._val = [(x, torch.sin(x @ self.w)) for x in xs]

    def next_train_batch(self):
        x = torch.randn(self.batch_size, 4, generator=self.generator)
        self.num_batches += 1
        return x, torch.sin(x @ self.w)

    def val_batches(self):
        return self._val

    def state_dict(self):
        return {"num_batches": self.num_batches, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.num_batches = int(state["num_batches"])
        self.generator.set_state(state["generator"])


def _toy_loop(**kw) -> LoopConfig:
    base = dict(
        max_steps=8,
        items_per_step=16,
        lr=2e-2,
        min_lr=2e-3,
        warmup_steps=2,
        eval_interval=3,
        log_interval=1,
        save_interval=2,
        k_schedule=KSchedule(type="step", k_min=1, k_max=2),
        freeze=["re:^head\\.bias$"],
    )
    base.update(kw)
    return LoopConfig(**base)


def _toy_run(out_dir, resume=False, seed=0):
    seed_everything(seed)
    model = ToyRegressor()
    result = fit(
        model,
        RegressionObjective(LossWeights(load_balance=0.01, z_loss=1e-3)),
        SineData(seed=7),
        _toy_loop(),
        out_dir,
        resume=resume,
        progress=False,
        device="cpu",
    )
    return model, result


def test_a_non_lm_family_trains_and_resumes_bit_exactly(tmp_path, monkeypatch):
    full_model, full = _toy_run(tmp_path / "a")
    assert full.step == 8 and full.stop_reason == "max_steps" and full.num_items == 8 * 16
    assert full.losses[-1][1] < full.losses[0][1]
    assert [h["step"] for h in full.history] == [3, 6, 8]
    last = load_checkpoint(tmp_path / "a" / "checkpoints")
    assert last.state["step"] == 8 and not (last.path / "tokenizer.json").exists()
    assert not full_model.head.bias.requires_grad  # the raw-regex freeze applied

    # Interrupt in the middle of step 6 (after its data was drawn), then resume in a fresh process
    # state: a differently seeded model, so the weights must come from the checkpoint.
    real = SineData.next_train_batch
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        batch = real(self)
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return batch

    monkeypatch.setattr(SineData, "next_train_batch", flaky)
    _, part = _toy_run(tmp_path / "b")
    assert part.stop_reason == "interrupted" and part.step == 5
    monkeypatch.undo()
    model, resumed = _toy_run(tmp_path / "b", resume=True, seed=99)
    assert resumed.step == 8 and part.losses + resumed.losses == full.losses
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.val_loss == full.val_loss


# ---- gradient accumulation ---------------------------------------------------------------------


def _f64_lm() -> MoEForCausalLM:
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffn_dim=64,
        moe=MoEConfig(dim=32, ffn_dim=32, num_experts=4, top_k=2),
        moe_placement="all",
    )
    torch.manual_seed(0)
    return MoEForCausalLM(cfg).double()


def test_two_micro_batches_equal_one_batch_of_twice_the_size_in_float64():
    gen = torch.Generator().manual_seed(0)
    b1, b2 = (torch.randint(0, 64, (3, 17), generator=gen) for _ in range(2))
    base = _f64_lm()
    # The aux losses are nonlinear in the batch, so only the (linear) LM loss can match exactly.
    objective = CausalLMObjective(LossWeights())
    loop = dict(max_steps=3, lr=1e-2, min_lr=1e-3, warmup_steps=1, grad_clip=0.5, weight_decay=0.1)
    split, whole, half = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    r_split = fit(
        split,
        objective,
        BatchListDataModule([b1, b2]),
        LoopConfig(grad_accum=2, **loop),
        None,
        progress=False,
    )
    r_whole = fit(
        whole, objective, BatchListDataModule([torch.cat([b1, b2])]), LoopConfig(**loop), None, progress=False
    )
    fit(half, objective, BatchListDataModule([b1]), LoopConfig(**loop), None, progress=False)
    assert next(split.parameters()).dtype == torch.float64
    # The objective is written once: the model's own labels= loss is the same cross-entropy.
    ids = torch.cat([b1, b2])
    direct = objective(base, ids).metrics["lm_loss"]
    torch.testing.assert_close(direct, base(ids, labels=ids).lm_loss, rtol=1e-12, atol=0)
    for (_, a), (_, b) in zip(r_split.losses, r_whole.losses):
        assert a == pytest.approx(b, rel=1e-13, abs=0)
    moved = 0
    for (name, p), q, h, p0 in zip(
        split.named_parameters(), whole.parameters(), half.parameters(), base.parameters()
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
        moved += int(not torch.equal(p, p0))
        if not torch.equal(p, p0) and "router" in name:
            assert not torch.allclose(h, q, atol=1e-6)  # one micro-batch alone trains differently
    assert moved > 10


# ---- freeze groups come from the model ---------------------------------------------------------


def _regex_groups(names):
    out = {}
    for group, (regex, invert) in FREEZE_GROUPS.items():
        out[group] = {n for n in names if bool(re.search(regex, n)) != invert}
    return out


@pytest.mark.parametrize(
    "moe",
    [
        {"num_experts": 4, "top_k": 2},
        {
            "num_experts": 4,
            "top_k": 2,
            "shared_ffn_dim": 16,
            "shared_expert_gate": True,
            "residual_moe": True,
        },
        {"num_experts": 4, "top_k": 2, "num_zero_experts": 1, "num_constant_experts": 1, "router_bias": True},
    ],
)
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_model_parameter_groups_match_the_named_groups(moe, attention):
    extra = {}
    if attention == "mla":
        extra = dict(
            attention_type="mla",
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
        )
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffn_dim=64,
        moe=MoEConfig(dim=32, ffn_dim=32, **moe),
        num_dense_first_layers=1,
        **extra,
    )
    model = MoEForCausalLM(cfg)
    groups = model.parameter_groups()
    want = _regex_groups([n for n, _ in model.named_parameters()])
    assert set(groups) == set(FREEZE_GROUPS)
    for name in FREEZE_GROUPS:
        assert set(groups[name]) == want[name], name
    assert groups["dense_ffn"] and groups["router"] and groups["norms"]
    if moe.get("shared_ffn_dim"):
        assert any("residual_mlp" in n for n in groups["shared"])
    # Freezing uses these groups: a toy model without the method gets the MoE ones.
    toy = ToyRegressor()
    frozen = apply_freeze(toy, ["router", "norms"])
    assert frozen == {"moe.router.weight", "norm.weight", "norm.bias"}
    with pytest.raises(ValueError, match="unknown freeze group 'attention'"):
        apply_freeze(ToyRegressor(), ["attention"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_steps_and_resume(tmp_path):
    """The loop takes a device: a short bf16 run on CUDA, then a resume, also on CUDA."""
    seed_everything(0)
    model = ToyRegressor()
    objective = RegressionObjective(LossWeights(load_balance=0.01))
    loop = _toy_loop(max_steps=4, dtype="bf16", save_interval=2)
    res = fit(model, objective, SineData(seed=7), loop, tmp_path, progress=False, device="cuda")
    assert res.step == 4 and next(model.parameters()).is_cuda
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in res.losses)
    assert "torch_cuda" in load_checkpoint(tmp_path / "checkpoints").rng_tensors
    more = fit(ToyRegressor(), objective, SineData(seed=7), loop.replace(max_steps=6), tmp_path, resume=True,
               progress=False, device="cuda")  # fmt: skip
    assert more.step == 6 and more.num_steps_run == 2
