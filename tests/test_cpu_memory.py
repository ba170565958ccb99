"""keep_freed_memory: the opt-in glibc setting for CPU training (moekit.train.cpu_memory)."""

import subprocess
import sys

from moekit.train.cpu_memory import _libc


def test_keep_freed_memory_keeps_results_and_reports():
    # A child process: the setting is process-wide, so the test suite's own process keeps its allocator.
    code = (
        "import torch\n"
        "from moekit.train.cpu_memory import keep_freed_memory\n"
        "torch.manual_seed(0); a = torch.randn(3000, 3000, dtype=torch.float64)\n"
        "ref = (a @ a).sum().item()\n"
        "print(keep_freed_memory())\n"
        "for _ in range(3):\n"
        "    big = torch.empty(40_000_000); big.fill_(1.0); del big\n"
        "print((a @ a).sum().item() == ref)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == str(_libc() is not None)
    assert out[1] == "True"
