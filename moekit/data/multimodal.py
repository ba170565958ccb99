"""Generated multimodal VQA with no downloads: shape scenes (images) and 1-D signals, each with
questions whose answers are exact (Uni-MoE's toy setting: two modalities, one LM).

Signals (:func:`make_signals`): a sine, square or sawtooth wave of 1, 2 or 3 cycles over
``length`` samples, random phase and amplitude in [0.7, 1.0], plus N(0, 0.1) noise; labels
``wave`` and ``cycles`` (0-based).

Every (item, question) pair is one example, a token sequence of a tiny word vocabulary:

    [bos] [placeholder x P] [question] [answer] [eos]

with ``P`` placeholders (``IMAGE_ID`` or ``SIGNAL_ID``) where the modality's features go.
``labels`` are -100 except at the answer, so the loss and accuracy are on the answer alone (the
token before it predicts it: ``logits[:, ANSWER_POS - 1]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.data.base import DataModule
from moekit.data.images import (
    COLOURS,
    COUNT_WORDS,
    SHAPES,
    ImagePreprocess,
    make_shape_scenes,
    preprocess_images,
)

MODALITIES = ("image", "signal")
WAVES = ("sine", "square", "saw")
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, SIGNAL_ID = 0, 1, 2, 3, 4
# question word -> (modality, label key, answer words)
QUESTIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "colour": ("image", "colour", COLOURS),
    "shape": ("image", "shape", SHAPES),
    "count": ("image", "count", COUNT_WORDS),
    "wave": ("signal", "wave", WAVES),
    "cycles": ("signal", "cycles", COUNT_WORDS),
}
_WORDS = tuple(dict.fromkeys([*QUESTIONS, *COLOURS, *SHAPES, *COUNT_WORDS, *WAVES]))
VQA_VOCAB = {w: i + 5 for i, w in enumerate(_WORDS)}
VQA_VOCAB_SIZE = len(VQA_VOCAB) + 5


def make_signals(num: int, length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """``num`` generated signals ``[N, length]`` float32 with ``wave`` and ``cycles`` labels ``[N]``."""
    if length < 8:
        raise ValueError(f"make_signals: length={length} is too short to hold 3 cycles (use >= 8)")
    rng = np.random.RandomState(seed)
    wave, cycles = rng.randint(0, 3, num), rng.randint(0, 3, num)
    t = np.arange(length, dtype=np.float64) / length
    phase = rng.uniform(0, 1, num)[:, None]
    amp = rng.uniform(0.7, 1.0, num)[:, None]
    u = ((cycles[:, None] + 1) * t[None] + phase) % 1.0  # position within the cycle, in [0, 1)
    sine, square, saw = np.sin(2 * np.pi * u), np.where(u < 0.5, 1.0, -1.0), 2 * u - 1
    sig = np.choose(wave[:, None] * np.ones_like(u, dtype=np.int64), [sine, square, saw]) * amp
    sig = sig + rng.normal(0, 0.1, sig.shape)
    return {"signals": sig.astype(np.float32), "wave": wave, "cycles": cycles}


def vqa_sequences(question: str, answers_N: np.ndarray, num_placeholders: int) -> tuple[Tensor, Tensor]:
    """``(input_ids [N, P + 4], labels [N, P + 4])`` for one question over N items."""
    modality, _, words = QUESTIONS[question]
    holder = IMAGE_ID if modality == "image" else SIGNAL_ID
    num = len(answers_N)
    ids = torch.full((num, num_placeholders + 4), PAD_ID, dtype=torch.long)
    ids[:, 0], ids[:, 1 : 1 + num_placeholders] = BOS_ID, holder
    ids[:, num_placeholders + 1] = VQA_VOCAB[question]
    ids[:, num_placeholders + 2] = torch.tensor([VQA_VOCAB[words[int(a)]] for a in answers_N])
    ids[:, num_placeholders + 3] = EOS_ID
    labels = torch.full_like(ids, -100)
    labels[:, num_placeholders + 2] = ids[:, num_placeholders + 2]
    return ids, labels


def _modality_examples(modality: str, num: int, seed: int, image_size: int, signal_length: int, num_p: int):
    if modality == "image":
        scenes = make_shape_scenes(num, image_size, seed)
        prep = ImagePreprocess(size=image_size, channels=3, value_range=1.0)
        inputs, key, raw = preprocess_images(scenes["images"], prep), "pixel_values", scenes
    else:
        raw = make_signals(num, signal_length, seed)
        inputs, key = torch.from_numpy(raw["signals"]), "signal_values"
    ids, labels, rows = [], [], []
    for question, (mod, label, _) in QUESTIONS.items():
        if mod != modality:
            continue
        q_ids, q_labels = vqa_sequences(question, raw[label], num_p)
        ids.append(q_ids)
        labels.append(q_labels)
        rows.append(torch.arange(num))
    index = torch.cat(rows)
    ids_t = torch.cat(ids)
    return {
        key: inputs[index],
        "input_ids": ids_t,
        "labels": torch.cat(labels),
        "attention_mask": torch.ones_like(ids_t),
    }


class MultiModalVQADataModule(DataModule):
    """Image and signal VQA, one modality per batch in turn (Uni-MoE's modality-level batches):
    ``{"input_ids", "attention_mask", "labels", "pixel_values" | "signal_values", "modality"}``.

    Args:
        batch_size: examples per batch.
        num_placeholders: ``{"image": P_image, "signal": P_signal}``, the model's feature counts.
        modalities: the modalities drawn (e.g. ``("signal",)`` for one modality's stage).
        num_train, num_val: items per modality and split (each gives one example per question).
        image_size, signal_length: the generated inputs' sizes.
        seed: seeds the data and the batch order.
    """

    def __init__(
        self,
        batch_size: int,
        num_placeholders: dict[str, int],
        modalities: tuple[str, ...] = MODALITIES,
        num_train: int = 600,
        num_val: int = 150,
        image_size: int = 16,
        signal_length: int = 32,
        seed: int = 0,
    ) -> None:
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities:
            raise ValueError(
                f"MultiModalVQADataModule: modalities {list(modalities)} must be a non-empty subset of {MODALITIES}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.modalities = batch_size, tuple(modalities)
        sizes = (image_size, signal_length)
        self.train = {
            m: _modality_examples(m, num_train, seed, *sizes, num_placeholders[m]) for m in modalities
        }
        self.val = {
            m: _modality_examples(m, num_val, seed + 10_000, *sizes, num_placeholders[m]) for m in modalities
        }
        self.generator = torch.Generator().manual_seed(seed)
        self.num_drawn = 0

    def next_train_batch(self) -> dict[str, Tensor]:
        """A random batch of the next modality in turn."""
        m = self.modalities[self.num_drawn % len(self.modalities)]
        self.num_drawn += 1
        data = self.train[m]
        idx = torch.randint(0, len(data["input_ids"]), (self.batch_size,), generator=self.generator)
        return {**{k: v[idx] for k, v in data.items()}, "modality": torch.tensor(MODALITIES.index(m))}

    def val_batches(self) -> list[dict[str, Tensor]]:
        """Every modality's validation examples in fixed order."""
        return [b for m in self.modalities for b in self.modality_val_batches(m)]

    def modality_val_batches(self, modality: str) -> list[dict[str, Tensor]]:
        """One modality's validation examples, ``batch_size`` a batch."""
        data = self.val[modality]
        num = len(data["input_ids"])
        tag = torch.tensor(MODALITIES.index(modality))
        return [
            {**{k: v[i : i + self.batch_size] for k, v in data.items()}, "modality": tag}
            for i in range(0, num, self.batch_size)
        ]

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": state tensor, "num_drawn": batches drawn}``."""
        return {"generator": self.generator.get_state(), "num_drawn": self.num_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
        self.num_drawn = int(state["num_drawn"])

    def describe(self) -> dict[str, Any]:
        """Examples per modality and split."""
        return {f"num_train_{m}": len(d["input_ids"]) for m, d in self.train.items()}
