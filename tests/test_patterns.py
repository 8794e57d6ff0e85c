import pytest

import hinm_jax
from hinm_jax import HSS, NM, HiNM, Unstructured, VectorWise, parse_pattern


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("hinm:64:0.5:2:4", HiNM(64, 0.5, 2, 4)),
        ("2:4", NM(2, 4)),
        ("nm:1:8", NM(1, 8)),
        ("vw:32:0.75", VectorWise(32, 0.75)),
        ("unstructured:0.9", Unstructured(0.9)),
        ("hss:3:4,2:4", HSS(((3, 4), (2, 4)))),
    ],
)
def test_string_form_round_trips(text, pattern):
    assert parse_pattern(text) == pattern
    assert parse_pattern(pattern.spec) == pattern
    assert hash(parse_pattern(text)) == hash(pattern)


def test_patterns_are_frozen():
    p = HiNM(64, 0.5, 2, 4)
    with pytest.raises(Exception):
        p.n = 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NM(0, 4), "1 <= n < m"),
        (lambda: NM(4, 4), "1 <= n < m"),
        (lambda: HiNM(0, 0.5, 2, 4), "vector_size"),
        (lambda: HiNM(64, 1.0, 2, 4), "vector_sparsity"),
        (lambda: HiNM(64, -0.1, 2, 4), "vector_sparsity"),
        (lambda: VectorWise(32, 1.5), "vector_sparsity"),
        (lambda: Unstructured(1.0), "sparsity"),
        (lambda: HSS(()), "at least one"),
        (lambda: HSS(((5, 4),)), "1 <= n < m"),
        (lambda: parse_pattern("hinm:64:0.5"), "not understood"),
        (lambda: parse_pattern("2:4:8"), "not understood"),
        (lambda: parse_pattern("hinm:64:2:2:4"), "vector_sparsity"),
    ],
)
def test_bad_patterns_raise_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NM(2, 1.5), "must be an int"),
        (lambda: NM(True, 4), "n=True: must be an int"),
        (lambda: HiNM("64", 0.5, 2, 4), "vector_size='64'"),
        (lambda: HiNM(64, "0.5", 2, 4), "vector_sparsity='0.5'"),
        (lambda: VectorWise(32.0, 0.5), "vector_size=32.0"),
        (lambda: Unstructured(None), "sparsity=None"),
        (lambda: HSS(((2.5, 4),)), "int pairs"),
        (lambda: HSS(((True, 4),)), "int pairs"),
        (lambda: HSS((("2", "4"),)), "int pairs"),
        (lambda: parse_pattern(64), "pattern=64"),
    ],
)
def test_wrong_types_raise_type_error(make, message):
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize("s", [1 / 3, 2 / 3, 1 / 7, 0.123456789, 0.9999999, 0.5, 0.0, 1e-9])
def test_spec_round_trips_exactly(s):
    for p in (HiNM(64, s, 2, 4), VectorWise(16, s), Unstructured(s)):
        assert parse_pattern(p.spec) == p, p.spec
    assert HiNM(64, 0.5, 2, 4).spec == "hinm:64:0.5:2:4"


def test_density_and_fit():
    p = HiNM(64, 0.5, 2, 4)
    assert p.density(4096) == 0.25
    assert p.structure(4096, 1024) == (64, 2048, 2, 4)
    assert p.fit_error(4096, 1000) == "O=1000 is not a multiple of vector_size=64"
    assert "keeps no full stripe" in p.fit_error(6, 64)
    # floor(K (1-s) / M) * M, exact for decimal sparsities
    assert HiNM(32, 0.7, 2, 4).kept_inputs(1000) == 300
    assert NM(2, 4).fit_error(10, 8) == "K=10 is not a multiple of m=4"
    assert NM(2, 4).structure(64, 8) == (8, 64, 2, 4)
    assert VectorWise(8, 0.5).structure(10, 16) == (8, 5, 1, 1)
    assert Unstructured(0.9).density(10, 10) == pytest.approx(0.1)
    assert HSS(((3, 4), (2, 4))).density() == 0.375
    assert HSS(((3, 4), (2, 4))).fit_error(24, 4) == "K=24 is not a multiple of prod(m)=16"


def test_public_api():
    for name in hinm_jax.__all__:
        assert hasattr(hinm_jax, name), name
