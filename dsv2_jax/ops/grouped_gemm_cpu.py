"""The CPU grouped GEMM: `ragged_dot` as XLA:CPU custom calls into grouped_gemm_cpu.cc (the XLA FFI).

XLA:CPU has no grouped GEMM: `jax.lax.ragged_dot` expands densely, and a loop over row tiles ("blocked") pays
each loop step's per-op dispatch, so its cost still grows with the expert count. The kernel walks the groups
once per call, one register-blocked GEMM each, so cost follows the active rows. Forward and backward (dlhs,
drhs) are three FFI handlers in fp32; other dtypes are cast around them.

The source is compiled on first use with the host's C++ compiler (`$CXX`, else `c++`; ~3 s) for this CPU
(`-march=native`) into a per-user cache keyed by source, flags, jaxlib and CPU, written to a temporary name
and renamed, so concurrent processes never load a half-written library. Without a compiler the seam keeps
XLA's "blocked" path (`available()` is False; a warning says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_suffix(".cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes", "-Wno-return-type")
TARGETS = {"gemm": "DsvGroupedGemm", "gemm_t": "DsvGroupedGemmTransposed", "outer": "DsvGroupedOuter"}


def cache_dir() -> Path:
    """$DSV2_JAX_CACHE, else $XDG_CACHE_HOME/dsv2_jax, else ~/.cache/dsv2_jax."""
    root = os.environ.get("DSV2_JAX_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv2_jax"


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (Linux), else the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep)) or platform.machine()


def library_path(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, jax.lib.__version__, _cpu_id()])
                         .encode()).hexdigest()[:16]
    return cache_dir() / f"grouped_gemm_cpu-{key}.so"


def build(compiler: str) -> Path:
    """Compiles the kernel unless this exact build is cached; returns the shared library's path."""
    out = library_path(compiler)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [*shlex.split(compiler), *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            why = next((x for x in lines if "error" in x), lines[-1] if lines else f"exit status {done.returncode}")
            raise RuntimeError(f"{' '.join(cmd)} failed: {why}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA:CPU in this process (built at the first call)."""
    compiler = os.environ.get("CXX", "c++")
    try:
        lib = ctypes.CDLL(str(build(compiler)))
        for name in TARGETS.values():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"dsv2_jax: CPU grouped-GEMM kernel unavailable ({e}); using the XLA 'blocked' path",
                      stacklevel=2)
        return False
    return True


def _call(target: str, shape, *args):
    # The result has the inputs' type apart from shape and dtype: inside shard_map, their varying mesh axes.
    out = jax.typeof(args[0]).update(shape=shape, dtype=jnp.float32)
    return jax.ffi.ffi_call(TARGETS[target], out, vmap_method="sequential")(*args)


@jax.custom_vjp
def _ragged_dot_f32(lhs, rhs, group_sizes):
    return _call("gemm", (lhs.shape[0], rhs.shape[2]), lhs, rhs, group_sizes)


def _fwd(lhs, rhs, group_sizes):
    return _ragged_dot_f32(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _bwd(res, dy):
    lhs, rhs, group_sizes = res
    return (_call("gemm_t", lhs.shape, dy, rhs, group_sizes), _call("outer", rhs.shape, lhs, dy, group_sizes),
            None)


_ragged_dot_f32.defvjp(_fwd, _bwd)


def ragged_dot(lhs, rhs, group_sizes) -> jnp.ndarray:
    """lhs [M, K] sorted by group, rhs [E, K, N], group_sizes [E] int → [M, N] in lhs's dtype (fp32 inside):
    rows of group g times rhs[g]; rows past Σ group_sizes are zero. Differentiable in lhs and rhs. Inside
    shard_map all three must vary over the same mesh axes."""
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != rhs.shape[:1] or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"ragged_dot: lhs [M, K], rhs [E, K, N], group_sizes [E] expected, got lhs "
                         f"{lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    y = _ragged_dot_f32(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes.astype(jnp.int32))
    return y.astype(lhs.dtype)
