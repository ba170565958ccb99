"""Routing traces round-trip; reports render; bad traces give clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from moekit.analysis import load_trace, record_trace, save_trace, specialization, write_report
from moekit.layers import MoEConfig, MoELayer


class TwoLayerToy(nn.Module):
    """A stand-in with the model contract: forward returns ``routing``, one per MoE layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.moe = nn.ModuleList(
            [MoELayer(MoEConfig(dim=16, ffn_dim=16, num_experts=4, top_k=2)) for _ in range(2)]
        )

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        routing = []
        for layer in self.moe:
            out = layer(h, token_mask=attention_mask)
            h = h + out.hidden
            routing.append(out.routing)
        return type("Out", (), {"routing": routing})()


def _batches():
    ids = torch.randint(0, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0
    return [(ids, mask), (torch.randint(0, 50, (2, 10)), None)]


def test_trace_round_trip_excludes_padding(tmp_path):
    trace = record_trace(TwoLayerToy(), _batches(), "toy")
    assert trace.num_tokens == 3 * 10 - 4 + 20
    assert trace.sequence_ids.max() == 4
    path = save_trace(trace, tmp_path / "t.safetensors")
    again = load_trace(path)
    assert torch.equal(again.tokens, trace.tokens)
    for a, b in zip(again.expert_ids, trace.expert_ids):
        assert torch.equal(a, b)
    for a, b in zip(again.weights, trace.weights):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # stored as float16
    assert again.num_experts == [4, 4] and again.model == "toy"
    assert sum(layer_load.sum() for layer_load in again.load()) == trace.num_tokens * 2 * 2


def test_bad_trace_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="moekit trace"):
        load_trace(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a moekit routing trace"):
        load_trace(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="unreadable"):
        load_trace(tmp_path / "junk.safetensors")


def test_specialization_detects_token_determined_routing():
    trace = record_trace(TwoLayerToy(), _batches())
    tokens = torch.arange(200) % 8
    trace.tokens = tokens
    trace.sequence_ids = torch.zeros(200, dtype=torch.long)
    decided = torch.stack([tokens % 4, (tokens + 1) % 4], -1)
    random_ids = torch.stack([torch.randint(0, 4, (200,)), torch.randint(0, 4, (200,))], -1)
    trace.expert_ids = [decided, random_ids]
    trace.weights = [torch.ones(200, 2) / 2, torch.ones(200, 2) / 2]
    rows = specialization(trace)
    assert rows[0]["token_expert_nmi"] > 0.99
    assert rows[1]["token_expert_nmi"] < 0.3


def test_report_writes_pngs(tmp_path):
    log = tmp_path / "train_log.jsonl"
    recs = [
        {"step": s, "loss": 5 - s / 10, "lm_loss": 5 - s / 10, "router_entropy": [1.0, 1.1]}
        for s in range(10)
    ]
    recs += [{"step": 9, "val_loss": 4.2, "unigram_loss": 5.5}]
    log.write_text("\n".join(json.dumps(r) for r in recs))
    trace = record_trace(TwoLayerToy(), _batches())
    md = write_report(tmp_path / "rep", log, trace)
    text = md.read_text()
    for png in ("loss.png", "expert_load.png", "router_entropy.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
        assert png in text
    assert "4.2000" in text and "Unigram baseline: 5.5000" in text
    with pytest.raises(ValueError, match="nothing to report"):
        write_report(tmp_path / "empty")
