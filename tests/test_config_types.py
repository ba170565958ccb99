"""JsonConfig type checks: a wrong type is a ValueError naming the field and the wanted type."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import pytest

from moekit.config import ConfigTypeError, JsonConfig
from moekit.layers.config import MoEConfig
from moekit.models.config import ModelConfig
from moekit.models.presets import moe_tiny


def _tiny_dict() -> dict:
    return moe_tiny().to_dict()


@pytest.mark.parametrize(
    ("field", "value", "wanted"),
    [
        ("dim", "64", "expected int, got str '64'"),
        ("num_layers", 2.5, "expected int, got float 2.5"),
        ("num_layers", True, "expected int, got bool True"),
        ("num_kv_heads", "2", "expected int or None"),
        ("rope_theta", "1e4", "expected float"),
        ("attention_bias", 1, "expected bool, got int 1"),
        ("qk_norm", 3, "expected str"),
        ("moe_layer_indices", [0, "1"], "expected a list of int or None"),
        ("rope_scaling", [1, 2], "a JSON object"),
        ("moe", 8, "a MoEConfig object or None"),
    ],
)
def test_model_config_wrong_types_name_the_field(field, value, wanted):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}") as info:
        ModelConfig.from_dict(_tiny_dict() | {field: value})
    assert wanted in str(info.value)
    assert isinstance(info.value, ConfigTypeError)


def test_nested_config_error_names_the_path():
    data = _tiny_dict()
    data["moe"] = dict(data["moe"], num_experts="four")
    with pytest.raises(ValueError, match=r"ModelConfig\.moe\.num_experts: expected int, got str 'four'"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"ModelConfig\.moe\.top_k: expected int, got bool"):
        ModelConfig.from_json(
            json.dumps(_tiny_dict() | {"moe": dict(data["moe"], num_experts=4, top_k=True)})
        )


def test_direct_construction_and_replace_are_checked():
    with pytest.raises(ValueError, match=r"MoEConfig\.num_experts: expected int"):
        MoEConfig(dim=16, ffn_dim=32, num_experts="four", top_k=2)
    with pytest.raises(ValueError, match=r"ModelConfig\.dim: expected int"):
        moe_tiny().replace(dim="8")


def test_lax_but_safe_values_are_still_accepted():
    cfg = ModelConfig.from_dict(_tiny_dict() | {"rope_theta": 10000, "rms_norm_eps": 1})  # int -> float
    assert cfg.rope_theta == 10000
    cfg = ModelConfig.from_dict(_tiny_dict())
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # round trip
    listed = moe_tiny().replace(moe_placement="explicit", moe_layer_indices=[0])  # list for a tuple
    assert list(listed.moe_layer_indices) == [0]


@dataclasses.dataclass(kw_only=True)
class _Inner(JsonConfig):
    width: int = 1


@dataclasses.dataclass(kw_only=True)
class _Outer(JsonConfig):
    pair: tuple[float, float] = (0.0, 1.0)
    names: list[str] = dataclasses.field(default_factory=list)
    table: dict[str, int] = dataclasses.field(default_factory=dict)
    mode: Literal["a", "b"] = "a"
    inner: _Inner | None = None
    anything: Any = None
    checked_after: int = 0

    def __post_init__(self):
        if self.checked_after < 0:  # runs only after the type check passed
            raise ValueError("_Outer.checked_after must be >= 0")


@dataclasses.dataclass(kw_only=True)
class _Sub(_Outer):
    extra: int = 0


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"pair": [1, 2, 3]}, "_Outer.pair: expected a list of 2 values (float, float)"),
        ({"pair": [1, "x"]}, "_Outer.pair[1]"),
        ({"names": ["a", 3]}, "_Outer.names[1]: expected a list of str"),
        ({"table": {"a": "1"}}, "_Outer.table['a']"),
        ({"mode": "c"}, "_Outer.mode: expected one of 'a', 'b'"),
        ({"inner": {"width": 2.5}}, "_Outer.inner.width: expected int, got float"),
        ({"checked_after": "0"}, "_Outer.checked_after: expected int"),
    ],
)
def test_generic_annotations(data, needle):
    with pytest.raises(ValueError) as info:
        _Outer.from_dict(data)
    assert needle in str(info.value)


def test_generic_annotations_accept_good_values_and_subclasses_check_once():
    out = _Outer.from_dict({"pair": [1, 2.5], "inner": {"width": 3}, "anything": [object()], "mode": "b"})
    assert out.pair == (1, 2.5) and out.inner == _Inner(width=3)
    with pytest.raises(ValueError, match="must be >= 0"):
        _Outer(checked_after=-1)
    with pytest.raises(ValueError, match=r"_Sub\.extra: expected int"):
        _Sub(extra="1")
    with pytest.raises(ValueError, match="must be >= 0"):
        _Sub(checked_after=-1)  # the parent's own __post_init__ still runs


def test_hf_config_wrong_type_names_the_hf_key():
    from moekit.convert import config_from_hf

    hf = {
        "model_type": "mixtral",
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_local_experts": "four",
        "num_experts_per_tok": 2,
    }
    with pytest.raises(ValueError, match=r"num_local_experts='four' must be int") as info:
        config_from_hf(hf)
    assert "num_experts" in str(info.value)
    assert config_from_hf(hf | {"num_local_experts": 4}).moe.num_experts == 4
