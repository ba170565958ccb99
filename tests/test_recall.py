"""The associative-recall generator: layout, lookups, labels and the accuracy it scores."""

import pytest
import torch

from moekit.data.recall import IGNORE_INDEX, associative_recall_batch, recall_accuracy


def test_layout_and_answers_are_lookups():
    g = torch.Generator().manual_seed(0)
    ids, labels = associative_recall_batch(5, 6, 4, 10, 7, generator=g)
    assert ids.shape == labels.shape == (5, 20)
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        keys, values = row[0:12:2], row[1:12:2]
        assert len(set(keys)) == 6 and all(0 <= k < 10 for k in keys)
        assert all(10 <= v < 17 for v in values)
        table = dict(zip(keys, values, strict=True))
        for j in range(4):
            q, a = row[12 + 2 * j], row[13 + 2 * j]
            assert table[q] == a  # every answer is its key's value in this row's context
            assert lab[13 + 2 * j] == a
        scored = [i for i, v in enumerate(lab) if v != IGNORE_INDEX]
        assert scored == [13, 15, 17, 19]


def test_accuracy_scores_the_token_before_each_answer():
    ids, labels = associative_recall_batch(3, 4, 5, 8, 8, generator=torch.Generator().manual_seed(1))
    V = 16
    logits = torch.zeros(3, ids.shape[1], V)
    logits[:, :-1].scatter_(2, ids[:, 1:, None], 1.0)  # a perfect next-token oracle
    assert recall_accuracy(logits, labels) == 1.0
    logits[0, 8] = 0  # the first query of row 0 (position 2P = 8): now argmax = token 0, a key
    assert recall_accuracy(logits, labels) == pytest.approx(14 / 15)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="num_pairs"):
        associative_recall_batch(2, 9, 1, 8, 8)
    with pytest.raises(ValueError, match="num_queries"):
        associative_recall_batch(2, 2, 0, 8, 8)
