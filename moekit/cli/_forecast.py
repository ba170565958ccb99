"""Shared pieces of the time-series verbs: opening a forecaster, reading series, parsing quantiles."""

from __future__ import annotations

from pathlib import Path


def load_forecaster(path: str | Path, name: str | None = None):
    """A :class:`~moekit.models.forecaster.Forecaster` over the model ``moekit.from_pretrained`` opens
    at ``path``; ValueError when the folder holds a model that does not forecast."""
    from moekit.loader import from_pretrained, inspect_folder
    from moekit.models.forecaster import Forecaster
    from moekit.models.registry import families_for_task, family_of

    info = inspect_folder(path)
    model = from_pretrained(path)
    family = family_of(model)
    if family.task != "forecast":
        names = [f.name for f in families_for_task("forecast")]
        raise ValueError(
            f"{info.path} holds a {family.name} model, not a forecaster; train one with `moekit ts-train` "
            f"(families {names})"
        )
    return Forecaster(model, name=name or family.name)


def parse_quantiles(text: str | None) -> tuple[float, ...]:
    """``"0.1,0.5,0.9"`` -> ``(0.1, 0.5, 0.9)``; ValueError naming the bad item."""
    from moekit.models.forecaster import check_quantiles

    if not text:
        return ()
    out = []
    for item in text.split(","):
        try:
            out.append(float(item))
        except ValueError:
            raise ValueError(f"--quantiles: {item.strip()!r} is not a number; use e.g. 0.1,0.5,0.9") from None
    return check_quantiles(out)


def read_input(path: str, fmt: str, freq: str | None, min_length: int = 2):
    """The series of an input file (long, wide or JSONL; see :func:`moekit.timeseries.read_series`)."""
    from moekit.timeseries import read_series

    kwargs = {"min_length": min_length}
    if freq is not None and fmt != "jsonl":
        kwargs["freq"] = freq
    return read_series(path, fmt=fmt, **kwargs)


def add_input_arguments(p) -> None:
    """``--model``, ``--input``, ``--format``, ``--freq`` and ``--horizon``."""
    p.add_argument(
        "--model", required=True, help="a ts-train run folder (runs/NAME), checkpoint or model folder"
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help='series: long CSV (unique_id,ds,y), wide CSV (one column per series) or JSONL ({"sequence": [...]})',
    )
    p.add_argument("--format", default="auto", choices=("auto", "long", "wide", "jsonl"), help="input format")
    p.add_argument("--freq", help="frequency of ds (e.g. D, MS, h) when it cannot be inferred")
    p.add_argument("--horizon", type=int, required=True, help="steps to forecast")
