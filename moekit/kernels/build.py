"""Compiling and loading the native kernels (see the package doc for the contract).

A source is built with ``torch.utils.cpp_extension.load`` as a plain shared library
(``is_python_module=False``): loading it runs its ``TORCH_LIBRARY_FRAGMENT`` registrations, so
its ops appear under ``torch.ops.moekit``. The build folder is keyed by the source's hash (with
the shared headers beside it), the torch version and this CPU's feature flags, because the code
is compiled with ``-march=native`` and a library built for another CPU must never be loaded.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")
LDFLAGS = ("-fopenmp",)


def kernels_enabled() -> bool:
    """False when ``MOEKIT_KERNELS=0`` asks for the pure-PyTorch paths everywhere."""
    return os.environ.get("MOEKIT_KERNELS", "1").strip() not in ("0", "false", "no", "off")


def _cpu_signature() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def cache_dir() -> Path:
    """Where built kernels are kept: ``$MOEKIT_KERNEL_CACHE`` or ``~/.cache/moekit/kernels``."""
    root = os.environ.get("MOEKIT_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "moekit" / "kernels"


def _build_key(name: str, source: Path) -> str:
    import torch

    digest = hashlib.sha256()
    # Every shared header counts too: a source that includes one must rebuild when it changes.
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    for part in (source.read_bytes(), *headers, torch.__version__.encode(), _cpu_signature().encode()):
        digest.update(part)
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    return f"{name}-{digest.hexdigest()[:16]}"


@functools.cache
def load_ops(name: str) -> bool:
    """Builds (once per machine) and loads ``csrc/<name>.cpp``; True when its ops are registered.

    Returns False, warning once with the reason, when kernels are disabled, the source is missing,
    or the compiler fails: every caller then takes its pure-PyTorch path. The result is cached
    for the process (a library cannot be unloaded, so there is nothing to invalidate).
    """
    if not kernels_enabled():
        return False
    source = CSRC / f"{name}.cpp"
    if not source.is_file():
        warnings.warn(f"moekit kernel {name!r}: no source at {source}; using the PyTorch path", stacklevel=2)
        return False
    try:
        from torch.utils import cpp_extension

        key = _build_key(name, source)
        build_dir = cache_dir() / key
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=key.replace("-", "_"),
            sources=[str(source)],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - no compiler, a failed build: fall back, say why once
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(
            f"moekit kernel {name!r} could not be built ({first_line[:200]}); using the PyTorch path "
            "(set MOEKIT_KERNELS=0 to skip the attempt)",
            stacklevel=2,
        )
        return False
    return True
