"""Image data with no downloads: scikit-learn's bundled digits and generated scenes of shapes.

Preprocessing (:func:`preprocess_images`, the one documented step every image goes through):

1. check the layout: ``[N, H, W]`` (grey) or ``[N, H, W, C]`` (channels last, as numpy/PIL give);
   a channel count other than the target's is rejected (convert colour images first), and so is
   a size other than the target's when ``resize=False``;
2. scale to [0, 1] by dividing by ``value_range`` (16 for digits, 255 for 8-bit images);
3. resize to ``size x size`` (bilinear, ``align_corners=False``), when the size differs;
4. normalise each channel: ``(x - mean) / std``;
5. return float32 ``[N, C, size, size]``.

Scenes (:func:`make_shape_scenes`): 1 to 3 copies of one shape (square, circle, triangle) in one
colour (red, green, blue) on black, in distinct cells of a 2 x 2 grid, with a caption ("two red
circles") and the three labels (shape, colour, count - 1), so every answer is exact.

Data modules draw batches with their own ``torch.Generator``; ``state_dict`` holds its state and
the number of batches drawn, so a resumed run sees the same batches.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.config import JsonConfig
from moekit.data.base import DataModule

SHAPES = ("square", "circle", "triangle")
COLOURS = ("red", "green", "blue")
COUNT_WORDS = ("one", "two", "three")
TASKS = ("shape", "colour", "count")
# Caption vocabulary: pad, eos, bos, then the words. Ids are fixed so checkpoints stay valid.
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2  # eos != 2: transformers pools eos 2 by argmax (old CLIP configs)
WORDS = ("a",) + COUNT_WORDS + COLOURS + SHAPES + tuple(s + "s" for s in SHAPES)
VOCAB = {w: i + 3 for i, w in enumerate(WORDS)}
VOCAB_SIZE = len(VOCAB) + 3
CAPTION_LEN = 6  # bos + up to 3 words + eos, padded


@dataclass(kw_only=True)
class ImagePreprocess(JsonConfig):
    """The preprocessing step (module doc).

    Attributes:
        size: output side (pixels).
        channels: channels the model takes.
        value_range: the input's maximum (inputs are divided by it).
        mean, std: per-channel normalisation (one value each, or one per channel).
        resize: resize to ``size``; False rejects any other size.
    """

    size: int
    channels: int
    value_range: float = 255.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    resize: bool = True

    def __post_init__(self) -> None:
        if self.size <= 0 or self.channels <= 0 or self.value_range <= 0:
            raise ValueError("ImagePreprocess: size, channels and value_range must be positive")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise ValueError(f"ImagePreprocess.{name} needs 1 or {self.channels} values")
        if any(s <= 0 for s in self.std):
            raise ValueError("ImagePreprocess.std values must be positive")


def preprocess_images(images: Any, config: ImagePreprocess) -> Tensor:
    """Applies the documented preprocessing (module doc): ``[N, H, W(, C)]`` -> float32 ``[N, C, S, S]``.

    Raises:
        ValueError: one line naming the problem (layout, channels, size with ``resize=False``).
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4:
        raise ValueError(
            f"images have shape {tuple(x.shape)}; expected [N, H, W] (grey) or [N, H, W, C] (channels last)"
        )
    n, h, w, c = x.shape
    if c != config.channels:
        raise ValueError(
            f"images have {c} channel(s), the model expects {config.channels}; convert them first "
            "(e.g. grey to RGB by repeating the channel)"
        )
    if (h, w) != (config.size, config.size) and not config.resize:
        raise ValueError(f"images are {h}x{w}, the model expects {config.size}x{config.size} (resize=False)")
    x = x.permute(0, 3, 1, 2) / config.value_range
    if (h, w) != (config.size, config.size):
        x = F.interpolate(x, size=(config.size, config.size), mode="bilinear", align_corners=False)
    mean = torch.tensor(config.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


def read_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """One image file (PNG/JPEG through Pillow, or a numpy ``.npy``) as float32 ``[H, W, C]`` in [0, 1].

    ``source`` is a path or the file's bytes (``name`` then labels errors). Integer pixels are
    divided by their type's maximum (255 for 8-bit); float ``.npy`` arrays must already be in
    [0, 1]. A 2-D array or a grey image is one channel; colour images keep their channels (RGBA
    stays 4: :func:`preprocess_images` rejects a channel count the model does not take). Preprocess
    the result with ``value_range=1``.

    Raises:
        ValueError: one line naming the file and the problem (missing, unreadable, bad layout).
    """
    label = name or (str(source) if not isinstance(source, bytes) else "the image")
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"image file {path} does not exist")
        data = path.read_bytes()
    else:
        data = source
    if data[:6] == b"\x93NUMPY":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{label}: not a readable .npy image ({err})") from None
    else:
        try:
            from PIL import Image, UnidentifiedImageError
        except ModuleNotFoundError:
            raise ValueError(
                f"{label}: reading PNG/JPEG needs Pillow (pip install pillow); or pass a .npy"
            ) from None
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                arr = np.asarray(img)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(
                f"{label}: not a readable PNG/JPEG/.npy image ({str(err).splitlines()[0]})"
            ) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise ValueError(f"{label}: image array has shape {arr.shape}; expected [H, W] or [H, W, C]")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{label}: float image values must be finite and in [0, 1]")
    else:
        raise ValueError(f"{label}: image dtype {arr.dtype} is not numeric")
    return arr


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: ``(images [1797, 8, 8] in 0..16, labels [1797])``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the digits data needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _draw(img: np.ndarray, shape: str, colour: int, cy: float, cx: float, r: float) -> None:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "square":
        inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    elif shape == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:  # upright triangle: apex at the top, base at the bottom
        top, bottom = cy - r, cy + r
        half = (yy - top) / (2 * r) * r
        inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    img[inside, colour] = 1.0


def make_shape_scenes(num: int, size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """``num`` generated scenes: ``images [N, size, size, 3]`` in [0, 1], ``captions`` (strings),
    ``shape``, ``colour``, ``count`` (0-based) labels ``[N]``, deterministic in ``seed``."""
    if size < 8:
        raise ValueError(f"make_shape_scenes: size={size} is too small to draw shapes (use >= 8)")
    rng = np.random.RandomState(seed)
    images = np.zeros((num, size, size, 3), dtype=np.float32)
    shape_l, colour_l, count_l = (rng.randint(0, 3, num) for _ in range(3))
    cell = size / 2
    captions = []
    for i in range(num):
        cells = rng.permutation(4)[: count_l[i] + 1]
        for c in cells:
            r = cell * rng.uniform(0.25, 0.4)
            cy = (c // 2) * cell + cell / 2 + rng.uniform(-0.1, 0.1) * cell
            cx = (c % 2) * cell + cell / 2 + rng.uniform(-0.1, 0.1) * cell
            _draw(images[i], SHAPES[shape_l[i]], int(colour_l[i]), cy, cx, r)
        noun = SHAPES[shape_l[i]] + ("s" if count_l[i] else "")
        captions.append(f"{COUNT_WORDS[count_l[i]]} {COLOURS[colour_l[i]]} {noun}")
    return {
        "images": images,
        "captions": np.array(captions),
        "shape": shape_l,
        "colour": colour_l,
        "count": count_l,
    }


def tokenize_captions(captions: Any) -> tuple[Tensor, Tensor]:
    """Word-level ids ``[N, CAPTION_LEN]`` (bos, words, eos, pad) and the attention mask (1 = real).

    Raises:
        ValueError: a word outside the scene vocabulary, or a caption too long.
    """
    ids = torch.full((len(captions), CAPTION_LEN), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, text in enumerate(captions):
        words = str(text).split()
        unknown = [w for w in words if w not in VOCAB]
        if unknown:
            raise ValueError(f"caption {text!r}: word(s) {unknown} are not in the scene vocabulary")
        if len(words) + 2 > CAPTION_LEN:
            raise ValueError(f"caption {text!r} has more than {CAPTION_LEN - 2} words")
        row = [BOS_ID] + [VOCAB[w] for w in words] + [EOS_ID]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


class _SampledImages(DataModule):
    """Random batches of a fixed tensor dataset; fixed validation batches in order."""

    def __init__(self, train: dict[str, Tensor], val: dict[str, Tensor], batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train, self.val, self.batch_size = train, val, batch_size
        self.num_train = len(next(iter(train.values())))
        self.generator = torch.Generator().manual_seed(seed)
        self.num_drawn = 0

    def _indices(self) -> Tensor:
        self.num_drawn += 1
        return torch.randint(0, self.num_train, (self.batch_size,), generator=self.generator)

    def next_train_batch(self) -> dict[str, Tensor]:
        """A random batch (with replacement) of training items."""
        idx = self._indices()
        return {k: v[idx] for k, v in self.train.items()}

    def val_batches(self) -> list[dict[str, Tensor]]:
        """The validation set in fixed order, ``batch_size`` items a batch."""
        num = len(next(iter(self.val.values())))
        return [
            {k: v[i : i + self.batch_size] for k, v in self.val.items()}
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
        """Dataset sizes."""
        return {"num_train_images": self.num_train, "num_val_images": len(next(iter(self.val.values())))}


def _split(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    # Every k-th item is validation: deterministic, and every class appears in both splits.
    every = max(int(round(1 / val_fraction)), 2)
    idx = np.arange(n)
    return idx[idx % every != 0], idx[idx % every == 0]


class DigitsDataModule(_SampledImages):
    """scikit-learn's digits (10 classes) as ``{"pixel_values" [B, 1, S, S], "labels" [B]}``.

    Args:
        batch_size: images per batch.
        image_size: side after preprocessing (8 = native; others resize).
        val_fraction: share held out (every k-th image).
        seed: seeds the batch order.
    """

    def __init__(
        self, batch_size: int = 64, image_size: int = 8, val_fraction: float = 0.2, seed: int = 0
    ) -> None:
        images, labels = load_digits_arrays()
        prep = ImagePreprocess(size=image_size, channels=1, value_range=16.0)
        pixels = preprocess_images(images, prep)
        tr, va = _split(len(labels), val_fraction)
        lab = torch.from_numpy(labels)
        super().__init__(
            {"pixel_values": pixels[tr], "labels": lab[tr]},
            {"pixel_values": pixels[va], "labels": lab[va]},
            batch_size,
            seed,
        )
        self.preprocess = prep


def _scene_tensors(num: int, size: int, seed: int) -> tuple[dict[str, Tensor], ImagePreprocess]:
    scenes = make_shape_scenes(num, size, seed)
    prep = ImagePreprocess(size=size, channels=3, value_range=1.0)
    ids, mask = tokenize_captions(scenes["captions"])
    out = {
        "pixel_values": preprocess_images(scenes["images"], prep),
        "input_ids": ids,
        "attention_mask": mask,
        **{t: torch.from_numpy(scenes[t].astype(np.int64)) for t in TASKS},
    }
    return out, prep


class ShapesCaptionDataModule(_SampledImages):
    """Generated scenes with captions for CLIP: ``{"pixel_values", "input_ids", "attention_mask"}``.

    Args:
        batch_size: pairs per batch.
        num_train, num_val: scenes generated for each split (different seeds).
        image_size: side of the scenes.
        seed: seeds the scenes and the batch order.
    """

    def __init__(
        self,
        batch_size: int = 32,
        num_train: int = 1500,
        num_val: int = 300,
        image_size: int = 16,
        seed: int = 0,
    ) -> None:
        train, self.preprocess = _scene_tensors(num_train, image_size, seed)
        val, _ = _scene_tensors(num_val, image_size, seed + 10_000)
        keep = ("pixel_values", "input_ids", "attention_mask")
        super().__init__({k: train[k] for k in keep}, {k: val[k] for k in keep}, batch_size, seed)
        self.val_labels = {t: val[t] for t in TASKS}


class MultiTaskShapesDataModule(_SampledImages):
    """Generated scenes with three tasks (shape, colour, count), one task per batch in turn:
    ``{"pixel_values", "labels", "task"}`` (M3ViT trains tasks one batch at a time).

    Validation batches cover every task over the validation scenes.
    """

    task_names = TASKS
    task_num_classes = (3, 3, 3)

    def __init__(
        self,
        batch_size: int = 32,
        num_train: int = 1500,
        num_val: int = 300,
        image_size: int = 16,
        seed: int = 0,
    ) -> None:
        train, self.preprocess = _scene_tensors(num_train, image_size, seed)
        val, _ = _scene_tensors(num_val, image_size, seed + 10_000)
        keep = ("pixel_values",) + TASKS
        super().__init__({k: train[k] for k in keep}, {k: val[k] for k in keep}, batch_size, seed)

    def next_train_batch(self) -> dict[str, Tensor]:
        """The next task's batch (tasks in turn: shape, colour, count, shape, ...)."""
        task = self.num_drawn % len(TASKS)
        idx = self._indices()
        return {
            "pixel_values": self.train["pixel_values"][idx],
            "labels": self.train[TASKS[task]][idx],
            "task": torch.tensor(task),
        }

    def val_batches(self) -> list[dict[str, Tensor]]:
        """Every task over the validation scenes, in fixed order."""
        return self.task_val_batches(None)

    def task_val_batches(self, task: int | None) -> list[dict[str, Tensor]]:
        """Validation batches of one task (or all tasks for None)."""
        out = []
        tasks = range(len(TASKS)) if task is None else [task]
        num = len(self.val["pixel_values"])
        for t in tasks:
            for i in range(0, num, self.batch_size):
                out.append(
                    {
                        "pixel_values": self.val["pixel_values"][i : i + self.batch_size],
                        "labels": self.val[TASKS[t]][i : i + self.batch_size],
                        "task": torch.tensor(t),
                    }
                )
        return out
