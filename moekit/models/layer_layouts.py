"""Hybrid layer layouts as ModelConfig field values: Jamba's periods and BlackMamba-style layer
strings (``ModelConfig.layer_types`` with the MoE placement fields)."""

from __future__ import annotations

from typing import Any


def periodic_layer_types(num_layers: int, attn_layer_period: int, attn_layer_offset: int) -> tuple[str, ...]:
    """Jamba's layout: layer i is attention iff ``i % attn_layer_period == attn_layer_offset``, else Mamba."""
    if attn_layer_period <= 0 or not (0 <= attn_layer_offset < attn_layer_period):
        raise ValueError(
            f"attn_layer_offset={attn_layer_offset} must be in [0, attn_layer_period={attn_layer_period})"
        )
    return tuple(
        "attention" if i % attn_layer_period == attn_layer_offset else "mamba" for i in range(num_layers)
    )


def periodic_layer_ids(num_layers: int, period: int, offset: int) -> tuple[int, ...]:
    """The layers i with ``i % period == offset`` (Jamba's ``expert_layer_period``/``offset``)."""
    if period <= 0 or not (0 <= offset < period):
        raise ValueError(f"layer offset={offset} must be in [0, period={period})")
    return tuple(i for i in range(num_layers) if i % period == offset)


_PATTERN_LETTERS = {
    "a": ("attention", False),
    "A": ("attention", True),
    "m": ("mamba", False),
    "M": ("mamba", True),
}


def layout_from_pattern(pattern: str) -> dict[str, Any]:
    """ModelConfig fields for a BlackMamba-style layer string, one letter per layer.

    ``a``/``m``: an attention/Mamba layer with a dense FFN; ``A``/``M``: the same with the MoE FFN
    (spaces are ignored). E.g. ``"mMmM"`` is BlackMamba's alternation, ``"mMmMaMmM"`` a Jamba
    block. Returns ``num_layers``, ``layer_types``, ``moe_placement`` (``"explicit"``, or
    ``"none"`` without upper case) and ``moe_layer_indices``, to pass to :class:`ModelConfig` with the rest.
    """
    letters = pattern.replace(" ", "")
    bad = sorted(set(letters) - set(_PATTERN_LETTERS))
    if not letters or bad:
        raise ValueError(
            f"layer pattern {pattern!r}: use one letter per layer from a, A (attention), m, M (Mamba); "
            f"upper case = MoE FFN{f' (unknown: {bad})' if bad else ''}"
        )
    moe_ids = tuple(i for i, c in enumerate(letters) if _PATTERN_LETTERS[c][1])
    return {
        "num_layers": len(letters),
        "layer_types": tuple(_PATTERN_LETTERS[c][0] for c in letters),
        "moe_placement": "explicit" if moe_ids else "none",
        "moe_layer_indices": moe_ids or None,
    }
