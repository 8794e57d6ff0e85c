"""The CUDA ``mma.sp`` kernel behind ``jax.ffi``: build, SASS, lowering, adapter, and (on a GPU)
numerics against the reference.

Without nvcc the build tests skip; without ``cuobjdump`` (``pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm``) the SASS checks skip; without a GPU the ``gpu`` tests skip.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hinm_jax
from cuda_ffi import build, ffi, mma_model, packing, tiles
from hinm_jax import _cuda
from hinm_jax.format import SparseWeight, pack_metadata, unpack_metadata
from test_cuda_pack import activations, canonical


def reference_matmul(x, w):
    """The library's reference path (pure jnp), through the public API."""
    return hinm_jax.sparse_matmul(x, w, implementation="xla")

needs_nvcc = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found")


# ---------------------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------------------
def sparse_weight(seed, k, o, v, dtype=jnp.float16):
    """A SparseWeight with shuffled row_perm and vector index order. ``v=None``: NM(2, 4)."""
    if v is None:
        pattern = hinm_jax.NM(2, 4)
        vals, meta, vi, perm, dense = canonical(seed, k, o, o, k, identity=True, dtype=np.float32)
    else:
        pattern = hinm_jax.HiNM(v, 0.5, 2, 4)
        vals, meta, vi, perm, dense = canonical(seed, k, o, v, pattern.kept_inputs(k), dtype=np.float32)
    vals = jnp.asarray(vals, dtype)
    w = SparseWeight(
        values=vals,
        metadata=jnp.asarray(meta),
        vector_index=jnp.asarray(vi),
        row_perm=jnp.asarray(perm),
        shape=(k, o),
        pattern=pattern,
    )
    return w, dense


def _nvidia_bin(name: str) -> str | None:
    try:
        import nvidia  # type: ignore

        for root in nvidia.__path__:
            for sub in ("cu13", "cu12", "cuda_cuobjdump", "cuda_nvdisasm"):
                p = Path(root) / sub / "bin" / name
                if p.exists():
                    return str(p)
    except ImportError:
        pass
    return shutil.which(name)


def dump_sass(lib: Path) -> dict[str, dict[str, str]]:
    """``{arch: {function: sass}}`` via cuobjdump (skips the test if it is missing)."""
    cuobjdump, nvdisasm = _nvidia_bin("cuobjdump"), _nvidia_bin("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        pytest.skip("cuobjdump/nvdisasm not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    env = dict(os.environ, PATH=f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    text = subprocess.run([cuobjdump, "--dump-sass", str(lib)], capture_output=True, text=True, env=env, check=True).stdout
    out: dict[str, dict[str, str]] = {}
    for part in re.split(r"\n\s*arch = ", text)[1:]:
        arch = part.split()[0]
        for fn in re.split(r"Function : ", part)[1:]:
            name = fn.split()[0]
            out.setdefault(arch, {})[name] = fn
    return out


@pytest.fixture(scope="module")
def small_library():
    """The library with one tile configuration (id 0) for sm_80 and sm_90: a fast build."""
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    return build.build(archs=("80", "90"), defines={"HINM_SPMM_ONLY_CONFIG": 0})


def _check_kernel_sass(sass: dict[str, dict[str, str]], archs, expected_kernels: int):
    assert set(sass) >= {f"sm_{a}" for a in archs}, sorted(sass)
    for arch in archs:
        kernels = {n: s for n, s in sass[f"sm_{arch}"].items() if "spmm_kernel" in n}
        assert len(kernels) == expected_kernels, (arch, sorted(kernels))
        for name, body in kernels.items():
            gather = re.search(r"Lb([01])ELb([01])E", name).group(1) == "1"
            bf16 = re.search(r"Lb([01])ELb([01])E", name).group(2) == "1"
            hmma = "HMMA.SP.16832.F32.BF16" if bf16 else "HMMA.SP.16832.F32"
            assert hmma in body, (arch, name)
            assert "LDGSTS" in body, (arch, name)  # cp.async
            assert ("LDSM.16.MT88.4" in body) == gather, (arch, name)  # ldmatrix.trans for x^T
            assert "LDSM.16.M88.4" in body, (arch, name)
            assert "STL" not in body, (arch, name)  # no register spills


# ---------------------------------------------------------------------------------------------------------------
# Build and SASS (nvcc, no GPU).
# ---------------------------------------------------------------------------------------------------------------
@needs_nvcc
def test_small_build_has_sparse_mma_for_sm80_and_sm90(small_library):
    assert small_library.exists() and small_library.name == build.LIB_NAME
    _check_kernel_sass(dump_sass(small_library), ("80", "90"), expected_kernels=4)


@needs_nvcc
@pytest.mark.slow
def test_full_build_for_sm80_and_sm90():
    """Every configuration: 11 gather x 2 dtypes + 4 direct x 2 dtypes per arch."""
    lib = build.build(archs=("80", "90"))
    n_kernels = 2 * len(tiles.CONFIGS) + 2 * sum(c.direct for c in tiles.CONFIGS)
    _check_kernel_sass(dump_sass(lib), ("80", "90"), expected_kernels=n_kernels)
    table = ffi.library_configs(ffi.library(str(lib)))
    assert all(built for _, _, built in table)


@needs_nvcc
def test_library_tables_and_index_functions_match_python(small_library):
    lib = ffi.library(str(small_library))
    table = ffi.library_configs(lib)
    assert tuple(c for c, _, _ in table) == tiles.CONFIGS
    for c, smem, built in table:
        assert smem == c.smem_bytes, c
        assert built == (c.id == 0)
    assert ffi.probe(lib, "kBK") == packing.K_ALIGN
    assert ffi.probe(lib, "kPadMetaWord") == packing.PAD_META_WORD
    for lane in range(32):
        assert ffi.probe(lib, "meta_word", lane) == mma_model.meta_word(lane)
        assert ffi.probe(lib, "a_ldsm_row", lane) == mma_model.a_ldsm_row(lane)
        assert ffi.probe(lib, "bn_ldsm_row", lane) == mma_model.bn_ldsm_row(lane)
        for ks in (0, 1):
            assert ffi.probe(lib, "a_ldsm_chunk", lane, ks) == mma_model.a_ldsm_chunk(lane, ks)
            assert ffi.probe(lib, "bt_ldsm_krow", lane, ks) == mma_model.bt_ldsm_krow(lane, ks)
            assert ffi.probe(lib, "bn_ldsm_chunk", lane, ks) == mma_model.bn_ldsm_chunk(lane, ks)
    for r in range(128):
        for ch in range(4):
            assert ffi.probe(lib, "a_chunk_offset", r, ch) == mma_model.a_chunk_offset(r, ch)
        for ch in range(8):
            assert ffi.probe(lib, "bn_chunk_offset", r, ch) == mma_model.bn_chunk_offset(r, ch)
    for cpr in (4, 8, 16, 32):
        for kr in range(64):
            for ch in range(cpr):
                assert ffi.probe(lib, "bt_chunk_offset", kr, ch, cpr) == mma_model.bt_chunk_offset(kr, ch, cpr)


@needs_nvcc
def test_failed_build_reports_nvcc_output(tmp_path, monkeypatch):
    monkeypatch.setenv("HINM_JAX_CUDA_CACHE", str(tmp_path))
    with pytest.raises(build.BuildError, match="nvcc failed"):
        build.build(archs=("80",), defines={"HINM_SPMM_ONLY_CONFIG": "(", "X": 1})
    assert not list(tmp_path.rglob("*.so"))


def _call(w, t, config, bias=False):
    """What ffi.spmm hands the FFI call for ``w`` packed, with ``t`` tokens."""
    packed = _cuda.pack(w)
    o = w.shape[1]
    x = jnp.ones((t, w.shape[0]), w.dtype)
    b = jnp.ones((o,), jnp.float32) if bias else None
    return ffi.call_operands(x, packed, o, b, config=config)


@needs_nvcc
@pytest.mark.parametrize("v,t", [(128, 40), (None, 40), (128, 3)], ids=["hinm", "2:4", "hinm-t3"])
def test_handler_accepts_what_spmm_passes(small_library, v, t):
    """The handler's own checks (compiled C++, called through ctypes) accept exactly the
    operands ffi.spmm builds, with and without a bias."""
    lib = ffi.library(str(small_library))
    w, _ = sparse_weight(3, 256, 256, v)
    for bias in (False, True):
        operands, out_shape, attrs, _ = _call(w, t, tiles.CONFIGS[0], bias)
        assert ffi.check_call(lib, operands, out_shape, attrs) is None


@needs_nvcc
def test_handler_rejects_a_permutation_it_would_ignore(small_library):
    """A non-empty row_perm is applied only by the y^T epilogue: with transposed_out=0 the
    handler used to ignore it silently (wrong channels); now it is an error."""
    lib = ffi.library(str(small_library))
    w, _ = sparse_weight(4, 256, 256, 128)  # shuffled channels: row_perm is not empty
    operands, out_shape, attrs, transposed = _call(w, 40, tiles.CONFIGS[0])
    assert transposed and operands[4].shape == (256,)
    direct_out = (40, 256)
    why = ffi.check_call(lib, operands, direct_out, dict(attrs, transposed_out=np.int64(0)))
    assert why is not None and "row_perm (256,)" in why and "transposed_out=0" in why
    # The same call with an empty permutation is fine (packed rows are the channels).
    no_perm = operands[:4] + (jnp.zeros((0,), jnp.int32),) + operands[5:]
    assert ffi.check_call(lib, no_perm, direct_out, dict(attrs, transposed_out=np.int64(0))) is None
    # Other checks still answer through the same function.
    assert "bias" in ffi.check_call(lib, operands[:5] + (jnp.zeros((3,), jnp.float32),), out_shape, attrs)
    assert "not compiled" in ffi.check_call(lib, operands, out_shape, dict(attrs, config=np.int64(5)))


# ---------------------------------------------------------------------------------------------------------------
# Lowering for the CUDA platform (no GPU needed).
# ---------------------------------------------------------------------------------------------------------------
def _lowered_cuda_text(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _custom_calls(text):
    return re.findall(r"stablehlo\.custom_call @hinm_spmm\(.*?\{(.*?)\}", text)


@pytest.mark.parametrize("v,gather", [(64, 1), (None, 0)], ids=["hinm", "2:4"])
def test_adapter_lowers_to_the_ffi_custom_call(v, gather):
    w, _ = sparse_weight(0, 256, 256, v)
    x = jnp.ones((40, 256), jnp.float16)
    text = _lowered_cuda_text(_cuda.matmul, x, w)
    calls = re.findall(r"custom_call @hinm_spmm.*", text)
    assert len(calls) == 1
    assert f"gather = {gather} : i64" in calls[0]
    # HiNM here has shuffled channels: y^T (O, T_pad) then a transpose; 2:4 writes y directly.
    assert f"transposed_out = {gather} : i64" in calls[0]
    assert ("tensor<256x40xf16>" in calls[0]) == bool(gather)


def test_prepacked_weight_lowers_without_packing_in_graph():
    w, _ = sparse_weight(1, 128, 128, 32)
    wp = hinm_jax.pack_for(w, "cuda")
    assert wp.packed_for == "cuda" and wp.packed["metadata"].shape == (8, 2, 16)
    x = jnp.ones((9, 128), jnp.bfloat16)
    wb = dataclasses.replace(wp, values=wp.values.astype(jnp.bfloat16),
                             packed=dict(wp.packed, values=wp.packed["values"].astype(jnp.bfloat16)))
    text = _lowered_cuda_text(_cuda.matmul, x, wb)
    assert "custom_call @hinm_spmm" in text
    assert "sort" not in text  # no in-graph argsort: the packed copy is used


def test_gradient_lowers_through_custom_vjp():
    w, _ = sparse_weight(2, 128, 64, 32)
    x = jnp.ones((8, 128), jnp.float16)
    loss = lambda x: jnp.sum(_cuda.matmul(x, w).astype(jnp.float32) ** 2)
    text = _lowered_cuda_text(jax.value_and_grad(loss), x)
    assert len(re.findall(r"custom_call @hinm_spmm", text)) == 1  # forward only; backward is the reference


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: sparse_weight(0, 128, 64, 32, jnp.float32)[0], "float16 or bfloat16"),
        (lambda: sparse_weight(0, 128, 48, 16)[0], "multiple of 32"),
        (
            lambda: hinm_jax.compress(
                {"w": jnp.ones((64, 32), jnp.float16)}, hinm_jax.prune({"w": jnp.ones((64, 32))}, hinm_jax.NM(1, 4))
            )["w"],
            "2:4",
        ),
    ],
    ids=["f32", "v16", "nm14"],
)
def test_adapter_refuses_what_the_kernel_cannot_run(make, match):
    w = make()
    with pytest.raises(NotImplementedError, match=match):
        _cuda.matmul(jnp.ones((4, w.shape[0]), w.dtype), w)
    assert _cuda.pack(w) is None


def test_adapter_refuses_mixed_dtypes():
    w, _ = sparse_weight(0, 128, 64, 32, jnp.float16)
    with pytest.raises(NotImplementedError, match="both"):
        _cuda.matmul(jnp.ones((4, 128), jnp.float32), w)


def test_not_available_without_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    assert not _cuda.is_available()
    assert "cuda" not in hinm_jax.available_implementations()


def _corrupt_vector_index(w: SparseWeight, k: int) -> SparseWeight:
    vi = np.array(w.vector_index)
    vi[0, 3], vi[1, 0] = k + 5, -7  # out of range both ways
    return dataclasses.replace(w, vector_index=jnp.asarray(vi))


@pytest.mark.parametrize("v", [32, None], ids=["hinm", "2:4"])
def test_packed_leaves_are_device_arrays(v):
    """pack_for stores jax.Arrays (on the default device), not numpy arrays that a jitted
    call would upload again on every call; stacked weights too."""
    w, _ = sparse_weight(0, 256, 128, v)
    packed = hinm_jax.pack_for({"a": w}, "cuda")["a"].packed
    leaves = jax.tree.leaves(packed)
    assert len(leaves) == 4
    for leaf in leaves:
        assert isinstance(leaf, jax.Array) and not isinstance(leaf, np.ndarray), type(leaf)
    ws = [sparse_weight(s, 128, 64, 32)[0] for s in range(2)]
    stacked = SparseWeight(
        **{f: jnp.stack([getattr(x, f) for x in ws]) for f in ("values", "metadata", "vector_index", "row_perm")},
        shape=(2, 128, 64),
        pattern=ws[0].pattern,
        stack_axes=1,
    )
    for leaf in jax.tree.leaves(_cuda.pack(stacked)):
        assert isinstance(leaf, jax.Array) and leaf.shape[0] == 2


def test_concrete_pack_validates_and_traced_pack_marks_bad_indices():
    """A concrete weight with a vector index entry outside 0..K-1 is refused when packed
    (ValueError naming it); packed under jit (where nothing can raise) the entry becomes
    INVALID_INDEX, which the kernel never reads (NaN out, see test_cuda_pack)."""
    w, _ = sparse_weight(1, 128, 64, 32)
    bad = _corrupt_vector_index(w, 128)
    with pytest.raises(ValueError, match="vector_index"):
        _cuda.pack(bad)
    with pytest.raises(ValueError, match="vector_index"):
        hinm_jax.pack_for(bad, "cuda")
    vi = np.asarray(jax.jit(_cuda.pack)(bad)["vector_index"])
    good = np.asarray(jax.jit(_cuda.pack)(w)["vector_index"])
    assert vi[0, 3] == packing.INVALID_INDEX and vi[1, 0] == packing.INVALID_INDEX
    assert np.count_nonzero(vi != good) == 2  # everything else packs as before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cuda_metadata_codec_agrees_with_format(seed):
    """cuda_ffi keeps its own 2-bit codec (it must not import hinm_jax): it reads what
    hinm_jax.format writes, and the format reads what it writes."""
    rng = np.random.default_rng(seed)
    o, count = 24, int(rng.integers(1, 70))
    pos = rng.integers(0, 4, size=(o, count)).astype(np.uint32)
    words = np.asarray(pack_metadata(jnp.asarray(pos), 4))
    np.testing.assert_array_equal(packing.unpack_positions(words, count), pos)
    np.testing.assert_array_equal(np.asarray(packing.unpack_positions(jnp.asarray(words), count, jnp)), pos)
    mine = packing._pack_positions(pos, words.shape[1])
    np.testing.assert_array_equal(mine, words)
    np.testing.assert_array_equal(np.asarray(unpack_metadata(jnp.asarray(mine), 4, count)), pos)


def test_stacked_pack_has_a_stack_axis():
    ws = [sparse_weight(s, 128, 64, 32)[0] for s in range(3)]
    stacked = SparseWeight(
        values=jnp.stack([w.values for w in ws]),
        metadata=jnp.stack([w.metadata for w in ws]),
        vector_index=jnp.stack([w.vector_index for w in ws]),
        row_perm=jnp.stack([w.row_perm for w in ws]),
        shape=(3, 128, 64),
        pattern=ws[0].pattern,
        stack_axes=1,
    )
    packed = _cuda.pack(stacked)
    single = _cuda.pack(ws[1])
    for key in single:
        np.testing.assert_array_equal(np.asarray(packed[key][1]), np.asarray(single[key]))


# ---------------------------------------------------------------------------------------------------------------
# GPU numerics (skipped without an NVIDIA GPU).
# ---------------------------------------------------------------------------------------------------------------
_TOL = {jnp.dtype(jnp.float16): 2e-3, jnp.dtype(jnp.bfloat16): 1.6e-2}


def _assert_close(y, ref, dtype):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    scale = max(np.abs(ref).max(), 1.0)
    np.testing.assert_allclose(y, ref, rtol=_TOL[jnp.dtype(dtype)], atol=_TOL[jnp.dtype(dtype)] * scale)


GPU_CASES = [
    pytest.param(t, k, v, dtype, bias, id=f"T{t}-K{k}-V{v or '2:4'}-{jnp.dtype(dtype).name}-{'bias' if bias else 'nobias'}")
    for t in (1, 7, 128, 1000)
    for v in (32, 64, 128, None)
    for dtype in (jnp.float16, jnp.bfloat16)
    for k, bias in ((256, (t + (v or 0)) % 2 == 0), (1024, (t + (v or 0)) % 2 == 1))
] + [
    pytest.param(t, k, v, jnp.float16, True, id=f"T{t}-K{k}-V{v or '2:4'}-float16-bias")
    for t in (7, 1000)
    for v in (64, None)
    for k in (64, 4096)
]


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,v,dtype,bias", GPU_CASES)
def test_kernel_matches_reference(t, k, v, dtype, bias):
    o = 384 if v is None else 3 * (v or 128)
    w, _ = sparse_weight(t + k, k, o, v, dtype)
    x = jnp.asarray(activations(t, t, k), dtype)
    b = jnp.linspace(-2, 2, o).astype(dtype) if bias else None
    assert _cuda.is_available()
    y = jax.jit(_cuda.matmul)(x, w, b)
    ref = reference_matmul(x, w)
    if bias:
        ref = ref.astype(jnp.float32) + b.astype(jnp.float32)
    assert y.shape == (t, o) and y.dtype == dtype
    _assert_close(y, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("config", tiles.CONFIGS, ids=lambda c: f"{c.bm}x{c.bn}")
@pytest.mark.parametrize("mode", ["gather", "gather-identity-perm", "direct"])
def test_every_tile_configuration(config, mode):
    """Each compiled tile against the dense product; shuffled channels take the scalar
    epilogue, identity channels the 16-byte one, and plain 2:4 with O = 200 (rows padded to
    256) both."""
    if mode == "direct" and not config.direct:
        pytest.skip("no direct kernel for this tile height")
    k, t = 320, config.bn + 5
    if mode == "direct":
        o = 200
        vals, meta, vi, perm, dense = canonical(3, k, o, o, k, identity=True, shuffle_perm=True)
    else:
        v = min(config.bm, 128)
        o = 2 * max(v, 64)
        vals, meta, vi, perm, dense = canonical(3, k, o, v, 160, shuffle_perm=(mode == "gather"))
    packed = packing.pack(vals, meta, vi, perm)
    x = activations(4, t, k)
    bias = np.linspace(-1, 1, o)
    y = ffi.spmm(jnp.asarray(x, jnp.float16), packed, o, jnp.asarray(bias), config=config)
    _assert_close(y, x @ dense + bias, jnp.float16)


@pytest.mark.gpu
def test_default_dispatch_uses_the_kernel_and_falls_back():
    w, _ = sparse_weight(5, 256, 128, 64, jnp.bfloat16)
    x = jnp.asarray(activations(5, 33, 256), jnp.bfloat16)
    assert hinm_jax.available_implementations()[0] == "cuda"
    _assert_close(hinm_jax.sparse_matmul(x, w), reference_matmul(x, w), jnp.bfloat16)
    w32, _ = sparse_weight(5, 256, 128, 64, jnp.float32)  # not runnable by mma.sp: falls through
    y = hinm_jax.sparse_matmul(x.astype(jnp.float32), w32)
    np.testing.assert_allclose(np.asarray(y), np.asarray(reference_matmul(x.astype(jnp.float32), w32)), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gradient_matches_reference():
    w, _ = sparse_weight(6, 256, 128, 32, jnp.float16)
    x = jnp.asarray(activations(6, 20, 256), jnp.float16)
    f = lambda fn: jax.grad(lambda x: jnp.sum(fn(x, w).astype(jnp.float32) ** 2))(x)
    _assert_close(f(_cuda.matmul), f(reference_matmul), jnp.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_out_of_range_vector_index_gives_nan_not_a_read(dtype):
    """Entries outside 0..K-1 (here K + 5 and a large one) are never read: exactly the
    outputs whose kept positions use them are NaN, all others match the reference."""
    k, o, v, t = 256, 128, 64, 50
    vals, meta, vi, perm, dense = canonical(12, k, o, v, 128, dtype=jnp.dtype(dtype))
    vi = vi.copy()
    vi[0, 5], vi[1, 70] = k + 5, 1 << 30
    packed = packing.pack(vals, meta, vi, perm)  # no in_features: not validated
    x = activations(12, t, k)
    y = np.asarray(ffi.spmm(jnp.asarray(x, dtype), {kk: jnp.asarray(a) for kk, a in packed.items()}, o), np.float64)
    want_nan = np.isnan(mma_model.fragment_product(x, packed, o))
    assert want_nan.any() and not want_nan.all()
    np.testing.assert_array_equal(np.isnan(y), want_nan)
    ok = ~want_nan
    ref = x @ dense  # the weight before the two entries were broken
    tol = _TOL[jnp.dtype(dtype)] * max(np.abs(ref).max(), 1.0)
    assert np.all(np.abs(y[ok] - ref[ok]) <= tol + _TOL[jnp.dtype(dtype)] * np.abs(ref[ok]))


@pytest.mark.gpu
def test_prepacked_and_in_graph_packing_agree_and_zero_tokens():
    w, _ = sparse_weight(7, 512, 256, 128, jnp.float16)
    x = jnp.asarray(activations(7, 77, 512), jnp.float16)
    wp = hinm_jax.pack_for(w, "cuda")
    np.testing.assert_array_equal(np.asarray(jax.jit(_cuda.matmul)(x, w)), np.asarray(_cuda.matmul(x, wp)))
    assert _cuda.matmul(x[:0], wp).shape == (0, 256)
