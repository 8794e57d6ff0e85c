"""Sparsity patterns: frozen, hashable configuration objects.

Every pattern sees a weight as a matrix with an input (reduction) axis ``K`` and an
output-channel axis ``O`` (see ``shared/SPEC.md``). A pattern validates its own
arguments at construction and says, for a matrix shape, whether it fits and why not.

The patterns that have a compressed inference format (:class:`HiNM`, :class:`NM`,
:class:`VectorWise`) share one *block structure* ``(V, K_v, n, m)``: the output channels
are cut into blocks of ``V``; each block keeps ``K_v`` input indices (its vector index);
each output channel keeps ``n`` of every ``m`` consecutive vector-index entries.

Example:
    >>> import hinm_jax
    >>> p = hinm_jax.HiNM(vector_size=64, vector_sparsity=0.5, n=2, m=4)
    >>> p.density(4096)
    0.25
    >>> hinm_jax.parse_pattern("hinm:64:0.5:2:4") == p
    True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from fractions import Fraction
from typing import NamedTuple, Union

__all__ = [
    "Pattern",
    "HiNM",
    "NM",
    "VectorWise",
    "Unstructured",
    "HSS",
    "BlockStructure",
    "parse_pattern",
    "as_pattern",
]


class BlockStructure(NamedTuple):
    """The block structure of a pattern on one ``(K, O)`` matrix.

    Attributes:
      vector_size: ``V``, output channels per block (``O`` for plain N:M).
      kept_inputs: ``K_v``, input indices each block keeps (a multiple of ``m``).
      n: values kept per stripe.
      m: stripe length.
    """

    vector_size: int
    kept_inputs: int
    n: int
    m: int


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_sparsity(name: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: a sparsity must be a number in [0, 1), got {type(value).__name__}")
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name}={value!r}: a sparsity must be a number in [0, 1)")


def _check_nm(n: int, m: int) -> None:
    for name, v in (("n", n), ("m", m)):
        if not _is_int(v):
            raise TypeError(f"{name}={v!r}: must be an int, got {type(v).__name__}")
    if n < 1 or n >= m:
        raise ValueError(f"n={n}, m={m}: N:M sparsity needs 1 <= n < m")


def _check_vector_size(v: int) -> None:
    if not _is_int(v):
        raise TypeError(f"vector_size={v!r}: must be an int >= 1, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"vector_size={v!r}: must be an int >= 1")


def _number(x) -> str:
    """The shortest text that parses back to the same float (``repr``), ``"0.5"``,
    ``"0.3333333333333333"``; integral values without ``.0``."""
    r = repr(float(x))
    return r[:-2] if r.endswith(".0") else r


def _kept(k: int, sparsity: float, multiple: int) -> int:
    """``floor(k * (1 - sparsity) / multiple) * multiple``, exact for decimal sparsities."""
    keep = Fraction(str(sparsity))
    return math.floor(k * (1 - keep) / multiple) * multiple


class Pattern:
    """Base class of all patterns (frozen dataclasses)."""

    def fit_error(self, k: int, o: int) -> str | None:
        """Why a ``(K, O)`` matrix does not fit this pattern, or ``None`` if it fits."""
        raise NotImplementedError

    def density(self, k: int, o: int | None = None) -> float:
        """Fraction of the weights kept on a matrix with ``K = k`` inputs."""
        raise NotImplementedError

    def structure(self, k: int, o: int) -> BlockStructure | None:
        """The block structure on a ``(K, O)`` matrix, or ``None`` if the pattern has none."""
        return None

    @property
    def spec(self) -> str:
        """The short string form: ``parse_pattern(p.spec) == p`` exactly (sparsities are
        written with ``repr``)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec


@dataclasses.dataclass(frozen=True)
class HiNM(Pattern):
    """Hierarchical N:M: vector-wise pruning of input indices per block of ``V`` output
    channels, then ``n:m`` within each block's kept indices.

    Args:
      vector_size: ``V``, output channels per block.
      vector_sparsity: fraction of input indices each block drops (``s``).
      n: values kept in every stripe of ``m``.
      m: stripe length.

    Example:
        >>> HiNM(64, 0.5, 2, 4).density(1024)
        0.25
    """

    vector_size: int
    vector_sparsity: float
    n: int = 2
    m: int = 4

    def __post_init__(self):
        _check_vector_size(self.vector_size)
        _check_sparsity("vector_sparsity", self.vector_sparsity)
        _check_nm(self.n, self.m)

    def kept_inputs(self, k: int) -> int:
        return _kept(k, self.vector_sparsity, self.m)

    def fit_error(self, k, o):
        if o % self.vector_size:
            return f"O={o} is not a multiple of vector_size={self.vector_size}"
        if self.kept_inputs(k) < self.m:
            return f"K={k} keeps no full stripe of m={self.m} at vector_sparsity={self.vector_sparsity}"
        return None

    def density(self, k, o=None):
        return self.kept_inputs(k) / k * self.n / self.m

    def structure(self, k, o):
        return BlockStructure(self.vector_size, self.kept_inputs(k), self.n, self.m)

    @property
    def spec(self):
        return f"hinm:{self.vector_size}:{_number(self.vector_sparsity)}:{self.n}:{self.m}"


@dataclasses.dataclass(frozen=True)
class NM(Pattern):
    """Plain ``n:m`` sparsity along the input axis (2:4 on Sparse Tensor Cores).

    Example:
        >>> NM(2, 4).density(64)
        0.5
    """

    n: int = 2
    m: int = 4

    def __post_init__(self):
        _check_nm(self.n, self.m)

    def fit_error(self, k, o):
        if k % self.m:
            return f"K={k} is not a multiple of m={self.m}"
        return None

    def density(self, k=None, o=None):
        return self.n / self.m

    def structure(self, k, o):
        return BlockStructure(o, k, self.n, self.m)

    @property
    def spec(self):
        return f"{self.n}:{self.m}"


@dataclasses.dataclass(frozen=True)
class VectorWise(Pattern):
    """Vector-wise sparsity alone: each block of ``V`` output channels keeps the same
    ``floor(K * (1 - s))`` input indices (runs on dense tensor cores after a gather).

    Example:
        >>> VectorWise(32, 0.5).density(100)
        0.5
    """

    vector_size: int
    vector_sparsity: float

    def __post_init__(self):
        _check_vector_size(self.vector_size)
        _check_sparsity("vector_sparsity", self.vector_sparsity)

    def kept_inputs(self, k: int) -> int:
        return _kept(k, self.vector_sparsity, 1)

    def fit_error(self, k, o):
        if o % self.vector_size:
            return f"O={o} is not a multiple of vector_size={self.vector_size}"
        if self.kept_inputs(k) < 1:
            return f"K={k} keeps no input at vector_sparsity={self.vector_sparsity}"
        return None

    def density(self, k, o=None):
        return self.kept_inputs(k) / k

    def structure(self, k, o):
        return BlockStructure(self.vector_size, self.kept_inputs(k), 1, 1)

    @property
    def spec(self):
        return f"vw:{self.vector_size}:{_number(self.vector_sparsity)}"


@dataclasses.dataclass(frozen=True)
class Unstructured(Pattern):
    """Unstructured magnitude-style sparsity: each matrix keeps its
    ``round((1 - sparsity) * K * O)`` highest-scoring weights.

    Example:
        >>> Unstructured(0.9).density(100, 100)
        0.1
    """

    sparsity: float

    def __post_init__(self):
        _check_sparsity("sparsity", self.sparsity)

    def kept_count(self, size: int) -> int:
        return round((1 - Fraction(str(self.sparsity))) * size)

    def fit_error(self, k, o):
        if self.kept_count(k * o) < 1:
            return f"a {k}x{o} matrix keeps no weight at sparsity={self.sparsity}"
        return None

    def density(self, k, o=None):
        if o is None:
            return 1.0 - self.sparsity
        return self.kept_count(k * o) / (k * o)

    @property
    def spec(self):
        return f"unstructured:{_number(self.sparsity)}"


@dataclasses.dataclass(frozen=True)
class HSS(Pattern):
    """HighLight's hierarchical structured sparsity: rank-by-rank N:M along the input
    axis, the lowest rank (last in ``levels``) applied first on elements, each higher rank
    keeping ``n`` of every ``m`` groups of the rank below.

    Args:
      levels: ``((n_top, m_top), ..., (n0, m0))``.

    Example:
        >>> HSS(((3, 4), (2, 4))).density(64)
        0.375
    """

    levels: tuple

    def __post_init__(self):
        try:
            levels = tuple((n, m) for n, m in self.levels)
        except (TypeError, ValueError):
            raise TypeError(f"levels={self.levels!r}: must be a sequence of (n, m) int pairs") from None
        for n, m in levels:
            if not (_is_int(n) and _is_int(m)):
                raise TypeError(f"levels={self.levels!r}: must be a sequence of (n, m) int pairs")
        levels = tuple((int(n), int(m)) for n, m in levels)
        if not levels:
            raise ValueError("levels=(): HSS needs at least one (n, m) level")
        for n, m in levels:
            _check_nm(n, m)
        object.__setattr__(self, "levels", levels)

    @property
    def group(self) -> int:
        return math.prod(m for _, m in self.levels)

    def fit_error(self, k, o):
        if k % self.group:
            return f"K={k} is not a multiple of prod(m)={self.group}"
        return None

    def density(self, k=None, o=None):
        return math.prod(n / m for n, m in self.levels)

    @property
    def spec(self):
        return "hss:" + ",".join(f"{n}:{m}" for n, m in self.levels)


def parse_pattern(text: str) -> Pattern:
    """Parses the short string form of a pattern.

    Forms: ``"hinm:V:s:n:m"``, ``"n:m"`` or ``"nm:n:m"``, ``"vw:V:s"``,
    ``"unstructured:s"``, ``"hss:n1:m1,n0:m0"``.

    Example:
        >>> parse_pattern("2:4")
        NM(n=2, m=4)
    """
    if not isinstance(text, str):
        raise TypeError(f"pattern={text!r}: expected a Pattern or a string such as 'hinm:64:0.5:2:4'")
    parts = text.strip().lower().split(":")
    try:
        head = parts[0]
        if head == "hinm" and len(parts) == 5:
            return HiNM(int(parts[1]), float(parts[2]), int(parts[3]), int(parts[4]))
        if head == "nm" and len(parts) == 3:
            return NM(int(parts[1]), int(parts[2]))
        if head.isdigit() and len(parts) == 2:
            return NM(int(parts[0]), int(parts[1]))
        if head in ("vw", "vector") and len(parts) == 3:
            return VectorWise(int(parts[1]), float(parts[2]))
        if head == "unstructured" and len(parts) == 2:
            return Unstructured(float(parts[1]))
        if head == "hss" and len(parts) >= 3:
            body = text.strip().split(":", 1)[1]
            return HSS(tuple(tuple(int(v) for v in lvl.split(":")) for lvl in body.split(",")))
    except (TypeError, ValueError) as e:
        if "=" in str(e):
            raise ValueError(f"pattern={text!r}: {e}") from None
    raise ValueError(
        f"pattern={text!r}: not understood; use 'hinm:V:s:n:m', 'n:m', 'vw:V:s', "
        "'unstructured:s' or 'hss:n1:m1,n0:m0'"
    )


PatternLike = Union[Pattern, str]


def as_pattern(pattern: PatternLike) -> Pattern:
    """Returns ``pattern`` itself, or parses it if it is a string."""
    if isinstance(pattern, Pattern):
        return pattern
    return parse_pattern(pattern)
