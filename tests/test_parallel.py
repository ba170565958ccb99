"""Expert parallelism with 2 and 4 gloo processes equals the single-process run in float64."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import parallel_worker as pw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world: int, out_dir: Path) -> list[dict]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.parallel_worker", str(r), str(world), str(port), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    files = [out_dir / f"rank{r}.safetensors" for r in range(world)]
    missing = [str(f) for f in files if not f.exists()]
    assert not missing, f"ranks wrote no results: {missing}\n" + "\n".join(logs)
    return [load_file(str(f)) for f in files]


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(world, tmp_path):
    ranks = _run_ranks(world, tmp_path)
    model = pw.build()
    x, target, mask = pw.data(world)
    x = x.clone().requires_grad_(True)
    out, aux = model(x, mask)
    # Single process: the loss of the concatenated batch is the mean of the per-rank losses.
    per_row = ((out - target) ** 2).sum(-1) * mask
    loss = per_row.sum() / per_row.numel() + 0.1 * aux["load_balance"] + 0.01 * aux["z_loss"]
    loss = loss + 0.05 * aux["seq_balance"]
    loss.backward()
    tol = {"rtol": 1e-12, "atol": 1e-12}
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["out"], out[r : r + 1].detach(), **tol)
        for k, v in aux.items():
            torch.testing.assert_close(res[f"aux.{k}"], v.detach().reshape(1), **tol)
        # Each rank's loss is its local mean: its input gradient is W times the global one.
        torch.testing.assert_close(res["x_grad"], world * x.grad[r : r + 1], **tol)
    num_local = pw.NUM_EXPERTS // world
    for name, p in model.named_parameters():
        if "experts" in name:
            for r, res in enumerate(ranks):
                shard = p.grad[r * num_local : (r + 1) * num_local]
                torch.testing.assert_close(res[f"grad.{name}"], shard, **tol)
        else:
            torch.testing.assert_close(ranks[0][f"grad.{name}"], p.grad, **tol)


def test_experts_must_divide_over_ranks():
    from moekit.parallel.expert_parallel import expert_shard

    assert expert_shard(8, 4, 3) == (6, 2)
    with pytest.raises(ValueError, match="6 experts do not divide over 4 ranks"):
        expert_shard(6, 4, 0)
    with pytest.raises(ValueError, match="rank 4 is not in a group of 4"):
        expert_shard(8, 4, 4)


def test_parallelize_needs_distributed():
    from moekit.parallel import parallelize_experts

    with pytest.raises(ValueError, match="torchrun"):
        parallelize_experts(pw.build())
