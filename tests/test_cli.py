"""The ``moekit`` command: every verb has --help, errors are clear, layer-demo runs."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main as cli


def _verbs():
    return list(cli._available())


def test_every_registered_verb_imports():
    assert set(_verbs()) == set(cli.VERBS), "a verb in VERBS has no module"


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_help_for_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: moekit" in capsys.readouterr().out


def test_top_level_help_lists_verbs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for verb in _verbs():
        assert verb in out


def test_layer_demo_runs_and_reports(capsys):
    assert (
        cli.main(["layer-demo", "--dim", "32", "--ffn-dim", "64", "--tokens", "64", "--router", "top_p"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert sum(report["tokens_per_expert"]) == pytest.approx(report["experts_per_token"] * 64, rel=1e-3)


def test_bad_value_is_a_clear_error(capsys):
    assert cli.main(["layer-demo", "--top-k", "20"]) == 2
    assert "top_k=20 exceeds the number of experts" in capsys.readouterr().err
