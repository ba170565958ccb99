"""The native-kernel loader: it falls back with one warning instead of failing, and honours MOEKIT_KERNELS=0."""

from __future__ import annotations

import pytest

from moekit.kernels import build


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MOEKIT_KERNELS", "0")
    build.load_ops.cache_clear()
    try:
        assert not build.kernels_enabled()
        assert build.load_ops("anything") is False
    finally:
        build.load_ops.cache_clear()


def test_missing_source_warns_and_returns_false(monkeypatch):
    monkeypatch.setenv("MOEKIT_KERNELS", "1")
    build.load_ops.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no source"):
            assert build.load_ops("no_such_kernel") is False
    finally:
        build.load_ops.cache_clear()


def test_failed_build_warns_and_returns_false(monkeypatch, tmp_path):
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(build, "CSRC", tmp_path)
    monkeypatch.setenv("MOEKIT_KERNEL_CACHE", str(tmp_path / "cache"))
    build.load_ops.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built"):
            assert build.load_ops("broken") is False
    finally:
        build.load_ops.cache_clear()


def test_build_key_changes_with_the_source(tmp_path):
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int a;\n")
    b.write_text("int b;\n")
    assert build._build_key("k", a) != build._build_key("k", b)
    assert build._build_key("k", a) == build._build_key("k", a)


def test_build_key_changes_with_a_shared_header(tmp_path):
    source = tmp_path / "a.cpp"
    source.write_text('#include "h.h"\n')
    (tmp_path / "h.h").write_text("int h;\n")
    before = build._build_key("k", source)
    (tmp_path / "h.h").write_text("int h2;\n")
    assert build._build_key("k", source) != before


@pytest.mark.parametrize("name", ["decode_f32", "decode_step", "quant_gemv"])
def test_shipped_kernels_build_where_there_is_a_compiler(name, monkeypatch):
    # The kernel tests skip when their ops did not load; on a machine with a C++ compiler (CI
    # has one) that must never happen, or a broken source would pass as a skip.
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine: the pure-PyTorch paths are what runs")
    monkeypatch.setenv("MOEKIT_KERNELS", "1")
    assert (build.CSRC / f"{name}.cpp").is_file()
    assert build.load_ops(name) is True
