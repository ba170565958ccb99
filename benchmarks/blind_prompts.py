"""Held-out prompts for the real blind run: function headers from a run's validation documents.

Each prompt is one ``def name(...):`` header (without its newline: the model writes the body's
indentation itself, as it did in training, where a newline and the indent are one token), taken
from documents of the run's validation split (the same hash split training used, so the model
never trained on them). Writes JSONL (``id``, ``prompt``) for ``moekit blind make --prompts``.

Run: ``python benchmarks/blind_prompts.py --run runs/moe-small --num 60 --out prompts.jsonl``
"""

from __future__ import annotations

import argparse
import json
import random
import re

from moekit.data import read_text, resolve_corpus, split_documents
from moekit.train import TrainConfig

HEADER = re.compile(r"^( *)def [A-Za-z_][A-Za-z0-9_]*\([^()]*\)( -> [^:]+)?:\n", re.MULTILINE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", required=True, help="the run folder (its train_config.json names the corpus)"
    )
    parser.add_argument("--num", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = TrainConfig.from_json(f"{args.run}/train_config.json")
    docs = resolve_corpus(cfg.corpus, max_bytes=cfg.max_corpus_bytes)
    _, val = split_documents(docs, cfg.val_fraction)
    found = []
    for doc in val:
        for m in HEADER.finditer(read_text(doc)):
            if len(m.group(0)) <= 80:
                found.append(m.group(0).rstrip("\n"))
    rng = random.Random(args.seed)
    chosen = rng.sample(sorted(set(found)), min(args.num, len(set(found))))
    with open(args.out, "w") as f:
        for i, prompt in enumerate(chosen):
            f.write(json.dumps({"id": f"val-{i:03d}", "prompt": prompt}) + "\n")
    print(
        f"{len(chosen)} prompts from {len(val)} validation documents ({len(set(found))} headers) -> {args.out}"
    )


if __name__ == "__main__":
    main()
