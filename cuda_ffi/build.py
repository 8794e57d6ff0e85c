"""Builds ``hinm_spmm.cu`` with nvcc on first use, into a per-user cache.

The library lands in ``<cache>/<hash>/libhinm_spmm.so`` where the hash covers the source,
the XLA FFI header, the nvcc version, the target architectures and the flags, so a changed
input rebuilds and an unchanged one loads at once. Nothing here runs at import time.

Environment:
  ``HINM_JAX_CUDA_ARCHS``: target SM versions, e.g. ``"80,90"`` (default: 80 and 90 plus the
  visible GPU's own, PTX of the newest for later GPUs).
  ``HINM_JAX_CUDA_CACHE``: cache directory (default ``$XDG_CACHE_HOME/hinm_jax/cuda`` or
  ``~/.cache/hinm_jax/cuda``).
  ``HINM_JAX_NVCC``: the nvcc to use (default: ``$CUDA_HOME/bin/nvcc``, ``nvcc`` on ``PATH``,
  ``/usr/local/cuda/bin/nvcc``, or the ``nvidia-cuda-nvcc`` wheel's).

Example:
    >>> from cuda_ffi import build
    >>> path = build.build(archs=("80",))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "SOURCE",
    "BuildError",
    "find_nvcc",
    "default_archs",
    "cache_dir",
    "compile_command",
    "library_path",
    "build",
]

SOURCE = Path(__file__).with_name("hinm_spmm.cu")
LIB_NAME = "libhinm_spmm.so"
DEFAULT_ARCHS = ("80", "90")
_FLAGS = ("-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC", "-diag-suppress", "940,2473")


class BuildError(RuntimeError):
    """nvcc is missing or failed."""


def find_nvcc() -> str | None:
    """Path of an nvcc, or ``None``."""
    cands = [os.environ.get("HINM_JAX_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    try:  # pip install nvidia-cuda-nvcc-cu12 / nvidia-cuda-nvcc
        import nvidia  # type: ignore

        for root in getattr(nvidia, "__path__", []):
            cands += [os.path.join(root, d, "bin", "nvcc") for d in ("cuda_nvcc", "cu13", "cu12")]
    except ImportError:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _device_arch() -> str | None:
    """``"90"`` for a compute capability 9.0 GPU visible to jax, else ``None``."""
    try:
        import jax

        for d in jax.devices():
            cc = getattr(d, "compute_capability", None)
            if d.platform == "gpu" and cc:
                major, minor = str(cc).split(".")[:2]
                return f"{major}{minor}"
    except Exception:  # no GPU backend: nothing to add
        return None
    return None


def default_archs(include_device: bool = True) -> tuple[str, ...]:
    """Target SM versions: ``HINM_JAX_CUDA_ARCHS`` or 80, 90 and the visible GPU's."""
    env = os.environ.get("HINM_JAX_CUDA_ARCHS")
    if env:
        archs = [a.strip().replace("sm_", "").replace(".", "") for a in env.replace(";", ",").split(",")]
        archs = [a for a in archs if a]
    else:
        archs = list(DEFAULT_ARCHS)
        dev = _device_arch() if include_device else None
        if dev and dev not in archs:
            archs.append(dev)
    for a in archs:
        if not a.rstrip("af").isdigit() or int(a.rstrip("af")) < 80:
            raise BuildError(f"HINM_JAX_CUDA_ARCHS: arch {a!r}: mma.sp needs sm_80 or newer")
    return tuple(sorted(set(archs), key=lambda a: (int(a.rstrip("af")), a)))


def cache_dir() -> Path:
    """Where built libraries live."""
    env = os.environ.get("HINM_JAX_CUDA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hinm_jax" / "cuda"


def _include_dir() -> str:
    import jax

    return jax.ffi.include_dir()


def compile_command(nvcc: str, archs, output: str, defines=()) -> list[str]:
    """The nvcc command line (a list)."""
    cmd = [nvcc, *_FLAGS, f"-I{_include_dir()}"]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    newest = archs[-1]
    cmd += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]  # PTX: JIT on later GPUs
    cmd += [f"-D{k}={v}" for k, v in sorted(dict(defines).items())]
    cmd += ["-o", output, str(SOURCE)]
    return cmd


def _nvcc_version(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"nvcc={nvcc}: cannot run it: {e}") from e


def library_path(archs=None, *, nvcc: str | None = None, defines=()) -> Path:
    """Cache path of the library for these inputs (whether or not it is built)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found: install the CUDA toolkit or set HINM_JAX_NVCC / CUDA_HOME")
    archs = tuple(archs) if archs else default_archs()
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update((Path(_include_dir()) / "xla" / "ffi" / "api" / "ffi.h").read_bytes())
    h.update((Path(_include_dir()) / "xla" / "ffi" / "api" / "api.h").read_bytes())
    h.update(_nvcc_version(nvcc).encode())
    h.update(repr((archs, _FLAGS, sorted(dict(defines).items()))).encode())
    return cache_dir() / h.hexdigest()[:20] / LIB_NAME


def build(archs=None, *, nvcc: str | None = None, defines=(), force: bool = False, verbose: bool = False) -> Path:
    """Compiles the library unless the cache has it; returns its path.

    Args:
      archs: SM versions such as ``("80", "90")`` (default :func:`default_archs`).
      nvcc: the compiler (default :func:`find_nvcc`).
      defines: preprocessor definitions, e.g. ``{"HINM_SPMM_ONLY_CONFIG": 0}``.
      force: rebuild even if cached.
      verbose: echo the command.

    Raises:
      BuildError: no nvcc, or it failed (the message holds its output).
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found: install the CUDA toolkit or set HINM_JAX_NVCC / CUDA_HOME")
    archs = tuple(archs) if archs else default_archs()
    path = library_path(archs, nvcc=nvcc, defines=defines)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = compile_command(nvcc, archs, tmp, defines)
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    threads = ["--threads", str(min(len(archs) + 1, os.cpu_count() or 1))]
    try:
        proc = subprocess.run(cmd[:1] + threads + cmd[1:], capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise BuildError(f"nvcc={nvcc}: {e}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        tail = (proc.stderr or proc.stdout)[-4000:]
        raise BuildError(f"nvcc failed ({proc.returncode}) building {SOURCE.name} for sm_{archs}:\n{tail}")
    os.replace(tmp, path)  # atomic: concurrent builders agree on the result
    return path
