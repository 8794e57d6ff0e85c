"""Bad inputs to checkpoints and PyTorch interop (issue #16): no data loss, clear errors,
nothing silently wrong."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hinm_jax
from hinm_jax import checkpoint, interop
from hinm_jax.core import Layout
from hinm_jax.masks import Mask

PATTERN = hinm_jax.HiNM(16, 0.5, 2, 4)


def _normal(shape, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _tree():
    params = {"dense": {"kernel": _normal((64, 32)), "bias": _normal((32,), seed=1)}}
    masks = hinm_jax.prune(params, PATTERN)
    return {
        "sparse": hinm_jax.compress(params, masks),
        "masks": masks,
        "counter": np.arange(5, dtype=np.int64),
    }


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _listing(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def _array_files(d):
    return [f for f in _listing(d) if f.startswith("arrays" + os.sep)]


def _edit_structure(d, edit):
    """Edits the structure file and (to get past the checksum) rewrites the manifest."""
    path = os.path.join(d, "structure", "metadata")
    with open(path) as f:
        structure = json.load(f)
    edit(structure)
    with open(path, "w") as f:
        json.dump(structure, f)
    checkpoint._write_manifest(str(d))


def _nodes(spec, type_):
    if isinstance(spec, dict):
        if spec.get("type") == type_:
            yield spec
        for v in spec.values():
            yield from _nodes(v, type_)
    elif isinstance(spec, list):
        for v in spec:
            yield from _nodes(v, type_)


# ---------------------------------------------------------------------------------------
# 1. save never destroys what it did not write
# ---------------------------------------------------------------------------------------


def test_failed_overwrite_keeps_the_old_checkpoint_and_removes_the_temporary(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    checkpoint.save(d, {"a": np.arange(4.0)})
    before = _listing(d)
    # a leaf that cannot be saved: refused before anything is written
    with pytest.raises(TypeError, match=r"^bad: dtype=<U1: only numeric and bool arrays can be saved"):
        checkpoint.save(d, {"bad": np.array(["x"])}, overwrite=True)

    # a failure after orbax has written the new checkpoint (in the temporary directory)
    def fail(directory):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(d, {"a": np.arange(8.0)}, overwrite=True)
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary left behind
    assert _listing(d) == before
    np.testing.assert_array_equal(checkpoint.restore(d)["a"], np.arange(4.0))


def test_failed_rename_restores_the_old_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    checkpoint.save(d, {"a": np.arange(4.0)})
    rename = os.rename

    def moving_the_new_one_in_fails(src, dst):  # orbax's own renames stay in the temporary
        if os.fspath(dst) == str(d) and os.path.basename(src) == "new":
            raise OSError("rename failed")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", moving_the_new_one_in_fails)
    with pytest.raises(OSError, match="rename failed"):
        checkpoint.save(d, {"a": np.arange(8.0)}, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt"]
    np.testing.assert_array_equal(checkpoint.restore(d)["a"], np.arange(4.0))


def test_previous_checkpoint_is_never_deleted_when_it_cannot_be_put_back(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    checkpoint.save(d, {"a": np.arange(4.0)})
    rename = os.rename

    def nothing_can_be_moved_to_d(src, dst):  # orbax's own renames stay in the temporary
        if os.fspath(dst) == str(d):
            raise OSError("device gone")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", nothing_can_be_moved_to_d)
    with pytest.raises(OSError, match=r"ckpt: could not be replaced nor put back; the previous checkpoint is in .*\.ckpt\.saving-.*old"):
        checkpoint.save(d, {"a": np.arange(8.0)}, overwrite=True)
    monkeypatch.undo()
    (staging,) = [p for p in os.listdir(tmp_path) if p.startswith(".ckpt.saving-")]
    np.testing.assert_array_equal(checkpoint.restore(tmp_path / staging / "old")["a"], np.arange(4.0))


def test_overwrite_replaces_a_checkpoint_completely(tmp_path):
    d = tmp_path / "ckpt"
    checkpoint.save(d, _tree())
    checkpoint.save(d, {"a": 1}, overwrite=True)
    assert checkpoint.restore(d) == {"a": 1}
    assert os.listdir(tmp_path) == ["ckpt"]
    assert not os.path.exists(d / "arrays")  # nothing of the old checkpoint is mixed in


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"results: not a hinm_jax checkpoint; overwrite=True refuses to replace it"):
        checkpoint.save(d, {"a": 1}, overwrite=True)
    assert (d / "notes.txt").read_text() == "precious"
    assert os.listdir(tmp_path) == ["results"]


def test_overwrite_refuses_a_checkpoint_holding_other_files(tmp_path):
    d = tmp_path / "ckpt"
    checkpoint.save(d, {"a": np.arange(3)})
    (d / "arrays" / "README").write_text("mine")
    with pytest.raises(ValueError, match=r"ckpt: holds files that are not part of the checkpoint \(arrays/README\)"):
        checkpoint.save(d, {"a": 2}, overwrite=True)
    assert (d / "arrays" / "README").read_text() == "mine"


def test_overwrite_onto_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"model\.bin: a file, not a checkpoint; overwrite=True replaces only a checkpoint directory"):
        checkpoint.save(f, {"a": 1}, overwrite=True)
    assert f.read_bytes() == b"weights"
    with pytest.raises(ValueError, match=r"model\.bin: a file, not a checkpoint directory"):
        checkpoint.restore(f)


def test_overwrite_replaces_a_checkpoint_of_the_previous_format(tmp_path):
    d = tmp_path / "old"
    (d / "structure").mkdir(parents=True)
    (d / "structure" / "metadata").write_text(json.dumps({"format": "hinm_jax.checkpoint/2", "tree": {"type": "none"}}))
    (d / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(ValueError, match=r"old: written in hinm_jax\.checkpoint/2 without checksums; save it again"):
        checkpoint.restore(d)
    checkpoint.save(d, {"a": 1}, overwrite=True)
    assert checkpoint.restore(d) == {"a": 1}


# ---------------------------------------------------------------------------------------
# 2. checksums and clear errors for damaged checkpoints
# ---------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    d = tmp_path / "ckpt"
    tree = _tree()
    checkpoint.save(d, tree)
    return d, tree


def test_flipped_bytes_in_array_data_are_detected(saved):
    d, _ = saved
    data = max(_array_files(d), key=lambda f: os.path.getsize(d / f))  # the array data
    raw = bytearray((d / data).read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF
    (d / data).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"ckpt: {data} damaged: sha256 mismatch; not restored"):
        checkpoint.restore(d)


def test_an_array_that_differs_from_its_checksum_is_named(saved, monkeypatch):
    """If the array data decodes to other values (files consistent with the manifest),
    the per-array checksum names the array."""
    d, _ = saved

    def edit(structure):
        node = next(n for n in _nodes(structure, "array") if n["path"] == "sparse/dense/kernel/values")
        node["sha256"] = "0" * 64

    _edit_structure(d, edit)
    with pytest.raises(ValueError, match=r"ckpt: sparse/dense/kernel/values: sha256 mismatch: the array's values are not those saved"):
        checkpoint.restore(d)


def test_truncated_array_file(saved):
    d, _ = saved
    data = max(_array_files(d), key=lambda f: os.path.getsize(d / f))
    size = os.path.getsize(d / data)
    with open(d / data, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=rf"ckpt: {data} has {size // 2} bytes, expected {size}: truncated or damaged"):
        checkpoint.restore(d)


def test_arrays_directory_deleted(saved):
    d, _ = saved
    shutil.rmtree(d / "arrays")
    with pytest.raises(ValueError, match=r"ckpt: arrays/ missing \(\d+ file\(s\) of the checkpoint\)"):
        checkpoint.restore(d)


def test_structure_file_deleted(saved):
    d, _ = saved
    os.remove(d / "structure" / "metadata")
    with pytest.raises(ValueError, match=r"ckpt: structure/metadata missing"):
        checkpoint.restore(d)
    shutil.rmtree(d / "structure")
    with pytest.raises(ValueError, match=r"ckpt: structure/ missing"):
        checkpoint.restore(d)


def test_manifest_deleted_or_damaged(saved):
    d, _ = saved
    (d / "hinm_jax.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"ckpt: hinm_jax\.json is damaged"):
        checkpoint.restore(d)
    os.remove(d / "hinm_jax.json")
    with pytest.raises(ValueError, match=r"ckpt: hinm_jax\.json is missing: not a hinm_jax checkpoint"):
        checkpoint.restore(d)


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: an empty directory, not a checkpoint \(hinm_jax\.json, structure/ and arrays/ are missing\)"):
        checkpoint.restore(tmp_path / "empty")


def test_edited_structure_fails_its_checksum(saved):
    d, _ = saved
    path = d / "structure" / "metadata"
    path.write_text(path.read_text().replace('"hinm:16:0.5:2:4"', '"hinm:32:0.5:2:4"'))
    with pytest.raises(ValueError, match=r"ckpt: structure/metadata \(the structure\) has been edited or damaged: sha256 mismatch"):
        checkpoint.restore(d)


def test_edited_vector_size_contradicts_the_vector_index(saved):
    """Even with the checksums rewritten, the restored SparseWeight is validated."""
    d, _ = saved

    def edit(structure):
        for node in _nodes(structure, "sparse"):
            node["pattern"] = "hinm:32:0.5:2:4"

    _edit_structure(d, edit)
    with pytest.raises(ValueError, match=r"ckpt: sparse/dense/kernel: shape=\(64, 32\) pattern hinm:32:0\.5:2:4: vector_index has shape \(2, 32\), expected \(1, 32\)"):
        checkpoint.restore(d)


def test_unknown_pattern_class(saved):
    d, _ = saved

    def edit(structure):
        next(_nodes(structure, "mask"))["pattern"] = "blockwise:4:0.5"

    _edit_structure(d, edit)
    with pytest.raises(ValueError, match=r"ckpt: masks/dense/kernel: unknown pattern in the structure: pattern='blockwise:4:0\.5': not understood"):
        checkpoint.restore(d)


def test_missing_structure_field_and_unknown_node_type(saved):
    d, _ = saved
    _edit_structure(d, lambda s: next(_nodes(s, "mask")).pop("stack_axes"))
    with pytest.raises(ValueError, match=r"ckpt: masks/dense/kernel: field 'stack_axes' is missing from the structure"):
        checkpoint.restore(d)
    _edit_structure(d, lambda s: (next(_nodes(s, "mask")).update(stack_axes=0), s["tree"]["items"][2].update(type="blob")))
    with pytest.raises(ValueError, match=r"ckpt: counter: unknown node type 'blob' in the structure"):
        checkpoint.restore(d)


def test_float64_jax_array_needs_x64_to_restore(tmp_path):
    with jax.enable_x64(True):
        x = jnp.arange(3, dtype=jnp.float64) / 3
        checkpoint.save(tmp_path / "x64", {"x": x})
        back = checkpoint.restore(tmp_path / "x64")
        assert back["x"].dtype == jnp.float64 and np.asarray(back["x"]).tobytes() == np.asarray(x).tobytes()
    with pytest.raises(TypeError, match=r"x64: x: dtype=float64: saved as a jax array, which jax holds only with jax_enable_x64"):
        checkpoint.restore(tmp_path / "x64")


# ---------------------------------------------------------------------------------------
# 3. restored masks and layouts are validated
# ---------------------------------------------------------------------------------------


def _mask_with(row_perm=None, vector_index=None):
    m = _tree()["masks"]["dense"]["kernel"]
    lay = m.layout
    return Mask(
        m.mask,
        Layout(lay.row_perm if row_perm is None else row_perm, lay.vector_index if vector_index is None else vector_index),
        m.pattern,
    )


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda: _mask_with(row_perm=jnp.zeros(32, jnp.int32)), r"layout row_perm is not a permutation of 0\.\.31"),
        (lambda: _mask_with(vector_index=jnp.full((2, 32), 64, jnp.int32)), r"layout vector_index has entries outside 0\.\.63"),
        (lambda: _mask_with(vector_index=jnp.zeros((2, 32), jnp.int32)), r"layout vector_index repeats an input inside a block"),
        (lambda: _mask_with(vector_index=jnp.zeros((2, 16), jnp.int32)), r"layout vector_index has shape \(2, 16\), expected \(2, 32\)"),
        (lambda: Mask(jnp.ones((64, 32), jnp.float32), None, PATTERN), r"mask has dtype float32, expected bool"),
        (lambda: Mask(jnp.ones((64, 32), bool), None, PATTERN), r"has no layout, but this pattern has a block structure"),
        (lambda: Mask(jnp.ones((64, 30), bool), None, PATTERN), r"does not fit"),
    ],
)
def test_inconsistent_masks_are_refused(tmp_path, damage, words):
    """save verifies what it wrote with restore's checks, so a damaged mask never
    reaches the disk and the message names its path."""
    with pytest.raises(ValueError, match=rf"m/w: shape=\(64, 3\d\) pattern .*: {words}"):
        checkpoint.save(tmp_path / "c", {"m": {"w": damage()}})
    assert os.listdir(tmp_path) == []


def test_restored_layout_is_checked(saved):
    """A layout edited on disk (row_perm and vector_index swapped, checksums rewritten)."""
    d, _ = saved

    def edit(structure):
        lay = next(_nodes(structure, "mask"))["layout"]
        lay["row_perm"], lay["vector_index"] = lay["vector_index"], lay["row_perm"]

    _edit_structure(d, edit)
    with pytest.raises(ValueError, match=r"ckpt: masks/dense/kernel: shape=\(64, 32\) pattern .*: layout row_perm has shape \(2, 32\), expected \(32,\)"):
        checkpoint.restore(d)


# ---------------------------------------------------------------------------------------
# 4. round trips stay bit exact, for every dtype
# ---------------------------------------------------------------------------------------


def test_round_trip_of_unusual_dtypes_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "f64": rng.standard_normal(7),
        "c128": rng.standard_normal(3) + 1j * rng.standard_normal(3),
        "u64": np.array([2**64 - 1, 3], np.uint64),
        "bool": np.array([True, False]),
        "f8": rng.standard_normal(9).astype(ml_dtypes.float8_e4m3fn),
        "bf16": _normal((3, 5), dtype=jnp.bfloat16),
        "nan": jnp.array([np.nan, -0.0, np.inf], jnp.float32),
        "empty": np.zeros((0, 3), np.float16),
    }
    checkpoint.save(tmp_path / "c", tree)
    back = checkpoint.restore(tmp_path / "c")
    for k, v in tree.items():
        assert type(back[k]) is type(v) or isinstance(v, jax.Array), k
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.asarray(back[k]).tobytes() == np.asarray(v).tobytes(), k


# ---------------------------------------------------------------------------------------
# Corrupting array files never restores different values (hypothesis)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine") / "ckpt"
    tree = _tree()
    checkpoint.save(d, tree)
    return d, _bits(tree)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_array_files_never_restore_silently(pristine, tmp_path_factory, data):
    src, bits = pristine
    d = tmp_path_factory.mktemp("corrupt") / "ckpt"
    shutil.copytree(src, d)
    files = _array_files(d)
    victims = data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=3, unique=True))
    for f in victims:
        raw = bytearray((d / f).read_bytes())
        if data.draw(st.booleans()) and len(raw) > 1:
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]  # truncate
        else:
            for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=16, unique=True)):
                raw[i] ^= data.draw(st.integers(1, 255))  # a real change
        (d / f).write_bytes(bytes(raw))
    try:
        back = checkpoint.restore(d)
    except ValueError as e:
        assert "ckpt" in str(e)
    else:
        assert _bits(back) == bits  # restored only if identical


# ---------------------------------------------------------------------------------------
# 5. from_torch keeps every dtype bit for bit, or refuses
# ---------------------------------------------------------------------------------------

try:
    import torch
except ImportError:  # the interop tests skip; the checkpoint tests above still run
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")


def _torch_bits(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_from_torch_keeps_float64_and_complex128_without_x64(dtype):
    t = torch.randn(8, 4, dtype=getattr(torch, dtype)) / 3
    params = interop.from_torch({"fc.weight": t, "fc.bias": t[0]})
    w = params["fc"]["weight"]
    assert isinstance(w, np.ndarray) and w.dtype == np.dtype(dtype) and w.shape == (4, 8)
    assert w.T.tobytes() == t.numpy().tobytes()
    back = interop.to_torch(params)
    assert back["fc.weight"].dtype == t.dtype and _torch_bits(back["fc.weight"]) == _torch_bits(t)


@needs_torch
def test_from_torch_gives_jax_float64_with_x64():
    t = torch.randn(8, 4, dtype=torch.float64) / 3
    with jax.enable_x64(True):
        w = interop.from_torch({"fc.weight": t})["fc"]["weight"]
        assert isinstance(w, jax.Array) and w.dtype == jnp.float64
        assert np.asarray(w).T.tobytes() == t.numpy().tobytes()


@needs_torch
@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"])
def test_from_torch_float8_round_trips_bit_for_bit(name):
    if not hasattr(torch, name) or not hasattr(ml_dtypes, name):
        pytest.skip(f"{name} missing from torch or ml_dtypes")
    t = (torch.randn(16, 8) * 4).to(getattr(torch, name))
    w = interop.from_torch({"fc.weight": t})["fc"]["weight"]
    assert isinstance(w, jax.Array) and w.dtype == np.dtype(getattr(ml_dtypes, name))
    assert np.asarray(w).T.tobytes() == _torch_bits(t)
    back = interop.to_torch({"fc": {"weight": w}})["fc.weight"]
    assert back.dtype == t.dtype and _torch_bits(back) == _torch_bits(t)


@needs_torch
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "make, dtype",
    [
        (lambda: torch.zeros(4, 2, dtype=torch.complex32), "torch.complex32"),
        (lambda: torch.zeros(4, 2, dtype=torch.float4_e2m1fn_x2), "torch.float4_e2m1fn_x2"),
        (lambda: torch.quantize_per_tensor(torch.zeros(4, 2), 0.1, 0, torch.qint8), "torch.qint8"),
    ],
)
def test_from_torch_refuses_dtypes_without_an_equivalent(make, dtype):
    with pytest.raises(TypeError, match=rf"^enc\.weight: dtype={dtype}: no numpy/jax equivalent"):
        interop.from_torch({"enc.weight": make()})


def test_from_torch_refuses_non_numeric_arrays():
    with pytest.raises(TypeError, match=r"^names: dtype=<U1: not a numeric tensor"):
        interop.from_torch({"names": np.array(["a", "b"])})


@needs_torch
def test_to_torch_refuses_dtypes_torch_lacks():
    with pytest.raises(TypeError, match=r"^w: dtype=int4: torch has no such dtype"):
        interop.to_torch({"w": np.zeros(4, ml_dtypes.int4)})


# ---------------------------------------------------------------------------------------
# 6. colliding names
# ---------------------------------------------------------------------------------------


@needs_torch
def test_from_torch_names_that_collide_after_conversion():
    sd = {"a/b.weight": torch.zeros(4, 4), "a.b.weight": torch.ones(4, 4)}
    with pytest.raises(ValueError, match=r"^'a/b\.weight' and 'a\.b\.weight': both become the path 'a/b/weight'"):
        interop.from_torch(sd)


def test_to_torch_names_that_collide():
    params = {"a.b": {"w": np.zeros(2, np.float32)}, "a": {"b": {"w": np.ones(2, np.float32)}}}
    with pytest.raises(ValueError, match=r"^a\.b\.w: two leaves get this torch name"):
        interop.to_torch(params)
