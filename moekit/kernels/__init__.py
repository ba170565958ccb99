"""Native CPU kernels, compiled on first use, each with a pure-PyTorch fallback.

Contract:
    * Every kernel lives in a C++ source under ``moekit/kernels/csrc/`` and registers its ops in
      the ``moekit`` op namespace (``TORCH_LIBRARY_FRAGMENT(moekit, m)``), so they are callable as
      ``torch.ops.moekit.<name>`` from eager code and from ``torch.compile`` graphs (each op has a
      fake implementation registered in Python beside its wrapper). A kernel that holds state
      across calls registers a TorchScript class instead (``torch.classes.moekit.DecodeStepPlan``,
      the whole-step decode of :mod:`moekit.kernels.step`). Shared C++ code lives in headers
      beside the sources (``gemv_f32.h``, ``quant_gemv.h``); each header is part of every build key.
    * :func:`~moekit.kernels.build.load_ops` compiles a source once per machine and torch version
      into a cache folder (``$MOEKIT_KERNEL_CACHE``, default ``~/.cache/moekit/kernels``) and
      returns False, with one warning, when there is no compiler or the build fails. Setting
      ``MOEKIT_KERNELS=0`` turns every native kernel off.
    * Every Python wrapper takes the native op when it loaded and otherwise runs a pure-PyTorch
      reference that gives the same result up to float rounding; tests check each op against its
      reference, and each wrapper can report which path ran.

Adding a kernel: put ``csrc/<name>.cpp`` here, register its ops with
``TORCH_LIBRARY_FRAGMENT(moekit, m)``, write a wrapper module that calls ``load_ops("<name>")``
and falls back to a reference, and add an oracle test in ``tests/``.

Modules: ``build`` (compile and load), ``linear`` (fp32 GEMV and one-token MoE), ``qlinear``
(int8/int4), ``step`` (the whole-step decode plan), ``memory`` (weights in huge pages), ``gemm``
(float32 products through oneDNN, with autograd).

Floor 0: imports nothing else from moekit, so every package may use it.
"""

from moekit.kernels.build import kernels_enabled, load_ops

__all__ = ["kernels_enabled", "load_ops"]
