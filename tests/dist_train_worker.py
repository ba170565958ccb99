"""One rank of a distributed `train` run for tests/test_distributed_train.py (launched like torchrun)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moekit.train import train
from tests.test_train import _config


def main(tmp: str, corpus: str, steps: int) -> None:
    import torch.distributed as dist

    result = train(_config(Path(tmp), corpus, max_steps=steps, eval_interval=2), progress=False)
    rank = dist.get_rank()
    Path(tmp, f"result{rank}.json").write_text(
        json.dumps({"step": result.step, "val_loss": result.val_loss, "losses": result.losses})
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
