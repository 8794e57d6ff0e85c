"""Builds ``hinm_spmm_cpu.cc`` with a C++ compiler on first use, into a per-user cache.

The library lands in ``<cache>/<hash>/libhinm_spmm_cpu.so``. The hash covers the source, the
XLA FFI headers, the compiler's version, the flags and the host's instruction set (the CPU flags
that ``-march=native`` reads), so a changed input or another machine sharing the cache rebuilds,
and an unchanged one loads at once. Nothing here runs at import time.

Environment:
  ``HINM_JAX_CXX``: the compiler (default ``$CXX``, then ``g++``, ``c++``, ``clang++`` on ``PATH``);
  when set, no other is tried.
  ``HINM_JAX_CPU_MARCH``: the ``-march`` value (default ``native``; e.g. ``x86-64-v3`` builds the
  AVX2 path, ``x86-64`` the portable one).
  ``HINM_JAX_CPU_CACHE``: cache directory (default ``$XDG_CACHE_HOME/hinm_jax/cpu`` or
  ``~/.cache/hinm_jax/cpu``).

Example:
    >>> from cpu_ffi import build
    >>> path = build.build()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["SOURCE", "BuildError", "find_compiler", "march", "cache_dir", "compile_command", "library_path", "build"]

SOURCE = Path(__file__).with_name("hinm_spmm_cpu.cc")
LIB_NAME = "libhinm_spmm_cpu.so"
_FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fno-math-errno", "-w")


class BuildError(RuntimeError):
    """No C++ compiler, or it failed (the message holds its output)."""


def find_compiler() -> str | None:
    """Path of a C++ compiler, or ``None``. ``HINM_JAX_CXX``, when set, is the only candidate."""
    env = os.environ.get("HINM_JAX_CXX")
    for c in (env,) if env else (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c:
            path = shutil.which(c)
            if path:
                return path
    return None


def march() -> str:
    """The ``-march`` value: ``HINM_JAX_CPU_MARCH`` or ``native``."""
    return os.environ.get("HINM_JAX_CPU_MARCH", "native")


def cache_dir() -> Path:
    """Where built libraries live."""
    env = os.environ.get("HINM_JAX_CPU_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hinm_jax" / "cpu"


def _include_dir() -> str:
    import jax

    return jax.ffi.include_dir()


def _host_isa() -> str:
    """What ``-march=native`` sees: the machine and its CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def compile_command(cxx: str, output: str) -> list[str]:
    """The compiler command line (a list)."""
    return [cxx, *_FLAGS, f"-march={march()}", f"-I{_include_dir()}", "-o", output, str(SOURCE)]


def _version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"compiler {cxx}: cannot run it: {e}") from e


def library_path(cxx: str | None = None) -> Path:
    """Cache path of the library for these inputs (whether or not it is built)."""
    cxx = cxx or find_compiler()
    if cxx is None:
        raise BuildError(
            f"no C++ compiler found (HINM_JAX_CXX={os.environ['HINM_JAX_CXX']!r})"
            if os.environ.get("HINM_JAX_CXX")
            else "no C++ compiler found (g++, c++ or clang++ on PATH, or set HINM_JAX_CXX)"
        )
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    for name in ("ffi.h", "api.h", "c_api.h"):
        header = Path(_include_dir()) / "xla" / "ffi" / "api" / name
        if header.exists():
            h.update(header.read_bytes())
    h.update(_version(cxx).encode())
    h.update(repr((_FLAGS, march(), _host_isa())).encode())
    return cache_dir() / h.hexdigest()[:20] / LIB_NAME


def build(cxx: str | None = None, *, force: bool = False) -> Path:
    """Compiles the library unless the cache has it; returns its path.

    Raises:
      BuildError: no compiler, or it failed (the message ends with its output).
    """
    cxx = cxx or find_compiler()
    path = library_path(cxx)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = compile_command(cxx, tmp)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise BuildError(f"compiler {cxx}: {e}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        tail = (proc.stderr or proc.stdout)[-4000:]
        raise BuildError(f"{Path(cxx).name} failed ({proc.returncode}) building {SOURCE.name}:\n{tail}")
    os.replace(tmp, path)  # atomic: concurrent builders agree on the result
    return path
