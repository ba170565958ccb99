"""Worker processes for tests/test_parallel.py: each rank writes its results to a file.

gloo sometimes aborts at teardown after correct work, so the test compares the files, not exit codes.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from moekit.layers import MoEConfig, MoELayer

D, NUM_EXPERTS, TOKENS_PER_RANK = 8, 4, 6


class TwoMoE(nn.Module):
    """Two MoE layers with a replicated dense layer between them."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.moe1 = MoELayer(cfg)
        self.mid = nn.Linear(D, D)
        self.moe2 = MoELayer(cfg)

    def forward(self, x, mask):
        o1 = self.moe1(x, token_mask=mask)
        h = x + o1.hidden
        h = h + torch.tanh(self.mid(h))
        o2 = self.moe2(h, token_mask=mask)
        aux = {k: o1.aux_losses[k] + o2.aux_losses[k] for k in o1.aux_losses}
        return h + o2.hidden, aux


def build(seed: int = 0, **overrides) -> TwoMoE:
    torch.manual_seed(seed)
    cfg = MoEConfig(dim=D, ffn_dim=12, num_experts=NUM_EXPERTS, top_k=2, **overrides)
    model = TwoMoE(cfg).double()
    with torch.no_grad():
        for layer in (model.moe1, model.moe2):
            layer.router.weight.mul_(3.0)
    return model


def data(world: int):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(world, TOKENS_PER_RANK, D, dtype=torch.float64, generator=g)
    target = torch.randn(world, TOKENS_PER_RANK, D, dtype=torch.float64, generator=g)
    mask = torch.ones(world, TOKENS_PER_RANK, dtype=torch.bool)
    mask[0, :2] = False  # padding on rank 0 only: token counts differ between ranks
    return x, target, mask


def loss_fn(out, aux, target, mask, num_ranks: int):
    # Mean over this rank's rows; with equal row counts the mean of rank means is the global mean.
    per_row = ((out - target) ** 2).sum(-1) * mask
    lm = per_row.sum() / per_row.numel()
    return lm + 0.1 * aux["load_balance"] + 0.01 * aux["z_loss"] + 0.05 * aux["seq_balance"]


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from safetensors.torch import save_file

    from moekit.parallel import full_state_dict, parallelize_experts

    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    parallelize_experts(model)
    x, target, mask = data(world)
    x_local = x[rank : rank + 1].clone().requires_grad_(True)
    out, aux = model(x_local, mask[rank : rank + 1])
    loss = loss_fn(out, aux, target[rank : rank + 1], mask[rank : rank + 1], world)
    loss.backward()
    with torch.no_grad():  # every rank calls it: the dispatch is collective
        ran = model.moe1(x_local.detach(), mask[rank : rank + 1]).backend
    assert ran == "all_to_all", ran
    results = {"out": out.detach(), "x_grad": x_local.grad}
    for k, v in aux.items():
        results[f"aux.{k}"] = v.detach().reshape(1)
    for name, p in model.named_parameters():
        grad = p.grad
        if "experts" not in name:  # replicated: what DDP would do
            dist.all_reduce(grad)
            grad = grad / world
        results[f"grad.{name}"] = grad
    full = full_state_dict(model)
    for k, v in full.items():
        results[f"full.{k}"] = v
        assert torch.equal(v, original[k]), k
    save_file(
        {k: v.contiguous() for k, v in results.items()}, os.path.join(out_dir, f"rank{rank}.safetensors")
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
