"""`moekit train` under torchrun-style launch: 2 gloo ranks, then resume on 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moekit.models import MoEForCausalLM
from moekit.parallel.expert_parallel import ExpertParallelExperts
from moekit.train import train
from tests.test_parallel import _free_port
from tests.test_train import _config, _write_corpus


def test_two_rank_training_checkpoints_in_single_device_format_and_resumes_on_one(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).parent.parent),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.dist_train_worker", str(tmp_path), str(corpus), "4"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    results = [tmp_path / f"result{r}.json" for r in range(2)]
    assert all(r.exists() for r in results), "\n".join(logs)
    r0 = json.loads(results[0].read_text())
    assert r0["step"] == 4
    # Both ranks evaluate the same validation batches with the same (sharded) model.
    assert json.loads(results[1].read_text())["val_loss"] == r0["val_loss"]
    # The checkpoint is the single-device format: it loads on one process and scores the same.
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    model = MoEForCausalLM.from_pretrained(ckpt)
    assert not any(isinstance(m, ExpertParallelExperts) for m in model.modules())
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert records[0]["world_size"] == 2
    # Resume on one process (a different expert-parallel size), optimizer state included.
    resumed = train(_config(tmp_path, corpus, max_steps=6, eval_interval=2), resume=True, progress=False)
    assert resumed.step == 6 and resumed.val_loss < r0["val_loss"]
