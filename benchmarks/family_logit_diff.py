"""Prints the largest logit difference to transformers over the tested configs of HF families
(the "max Δ" column of docs/interop.md), from the round trips in tests/test_convert_families.py.

    PYTHONPATH=. python benchmarks/family_logit_diff.py gpt_oss llama4_text
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_convert_families import CASES, round_trip  # noqa: E402


def main(families: list[str]) -> None:
    """Runs every case of each family and prints its max and per-case differences."""
    for family in families:
        diffs = []
        for name, overrides in CASES:
            if name == family:
                with tempfile.TemporaryDirectory() as tmp:
                    diffs.append(round_trip(name, Path(tmp), overrides))
        print(family, f"max {max(diffs):.1e}", " ".join(f"{d:.1e}" for d in diffs))


if __name__ == "__main__":
    main(sys.argv[1:] or sorted({name for name, _ in CASES}))
