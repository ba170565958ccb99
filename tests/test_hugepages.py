"""moekit.kernels.memory: weights moved into huge-page memory keep their values, ties and sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit.kernels import memory

pytestmark = pytest.mark.skipif(not memory.hugepages_available(), reason="no transparent huge pages here")


def test_move_keeps_values_ties_and_shared_buffers():
    emb = nn.Embedding(4096, 256)
    head = nn.Linear(256, 4096, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head, "small": nn.Linear(4, 4)})
    shared = torch.randn(1024, 1024)
    model.head.register_buffer("codes", shared)
    model.small.register_buffer("codes_alias", shared)
    before = emb.weight.detach().clone()
    small_ptr = model.small.weight.data_ptr()
    moved = memory.move_to_hugepages(model)
    assert moved == (4096 * 256 + 1024 * 1024) * 4
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight, before)
    assert model.head.codes is model.small.codes_alias and torch.equal(model.head.codes, shared)
    assert model.emb.weight.data_ptr() % memory.HUGE_PAGE == 0
    assert model.small.weight.data_ptr() == small_ptr  # under the size floor: left in place
    assert memory.move_to_hugepages(model) == 0  # once per model


def test_switch_off(monkeypatch):
    monkeypatch.setenv("MOEKIT_HUGEPAGES", "0")
    t = torch.randn(1024, 1024)
    assert memory.hugepage_copy(t) is t
