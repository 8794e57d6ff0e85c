"""PyTorch state_dict <-> canonical orientation (torch 2.13 CPU; skipped without torch)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import hinm_jax
from hinm_jax import interop, layers

torch = pytest.importorskip("torch")
import torch.nn.utils.prune  # noqa: E402

PATTERN = hinm_jax.HiNM(32, 0.5, 2, 4)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 16)
        self.conv = torch.nn.Conv2d(4, 32, 3, stride=2, padding=1, dilation=1)
        self.conv1d = torch.nn.Conv1d(8, 32, 5, padding=2, dilation=2)
        self.bn = torch.nn.BatchNorm2d(32)
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 32, bias=False)
        self.norm = torch.nn.LayerNorm(32)


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return TorchNet().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_bit_exact(dtype):
    net = _net(dtype)
    sd = net.state_dict()
    params = interop.from_torch(sd, module=net)
    assert params["fc1"]["weight"].shape == (64, 64)
    assert params["fc2"]["weight"].shape == (64, 32)
    assert params["conv"]["weight"].shape == (3, 3, 4, 32)
    assert params["conv1d"]["weight"].shape == (5, 8, 32)
    assert params["embed"]["weight"].shape == (10, 16)  # embeddings keep their layout
    assert params["bn"]["num_batches_tracked"].dtype == np.int64
    back = interop.to_torch(params, module=net)
    assert list(back) == list(sd)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(_bits(back[name]), _bits(t)), name


def _bits(t):
    if t.is_floating_point():
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def test_guessed_layouts_match_module_layouts():
    net = _net()
    sd = net.state_dict()
    assert interop.torch_layouts(sd) == interop.torch_layouts(sd, module=net)
    kinds = interop.torch_layouts(sd, module=net)
    assert kinds["fc1.weight"] == "linear" and kinds["conv.weight"] == "conv" and kinds["embed.weight"] == "keep"
    mha = torch.nn.MultiheadAttention(32, 4)
    assert interop.torch_layouts(mha.state_dict(), module=mha)["in_proj_weight"] == "linear"


def test_linear_and_conv_orientation_match_torch():
    net = _net()
    params = interop.from_torch(net.state_dict(), module=net)
    x = torch.randn(3, 64)
    ref = net.fc1(x).detach().numpy()
    y = x.numpy() @ np.asarray(params["fc1"]["weight"]) + np.asarray(params["fc1"]["bias"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    img = torch.randn(2, 4, 9, 9)
    ref = net.conv(img).detach().numpy().transpose(0, 2, 3, 1)
    conv = nn.Conv(32, (3, 3), strides=2, padding=1)
    y = conv.apply({"params": {"kernel": params["conv"]["weight"], "bias": params["conv"]["bias"]}}, img.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    seq = torch.randn(2, 8, 20)
    ref = net.conv1d(seq).detach().numpy().transpose(0, 2, 1)
    conv1 = nn.Conv(32, (5,), padding=2, kernel_dilation=2)
    y = conv1.apply({"params": {"kernel": params["conv1d"]["weight"], "bias": params["conv1d"]["bias"]}}, seq.numpy().transpose(0, 2, 1))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_prune_torch_checkpoint_and_hand_masks_back():
    """Prune in hinm_jax; torch with the returned masks computes what the compressed
    weights compute in JAX."""
    net = _net()
    params = interop.from_torch(net.state_dict(), module=net)
    where = r"^(fc1|fc2|conv)/weight$"
    masks = jax.jit(lambda p: hinm_jax.prune(p, PATTERN, where=where))(params)
    tmasks = interop.masks_to_torch(masks, module=net)
    assert sorted(tmasks) == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert tmasks["conv.weight"].shape == net.conv.weight.shape and tmasks["conv.weight"].dtype == torch.bool
    for name in ("fc1", "fc2", "conv"):
        torch.nn.utils.prune.custom_from_mask(getattr(net, name), "weight", tmasks[f"{name}.weight"])
    sparse = jax.jit(hinm_jax.compress)(params, masks)

    x = torch.randn(5, 64)
    ref = net.fc2(torch.relu(net.fc1(x))).detach().numpy()
    h = jax.nn.relu(hinm_jax.sparse_matmul(x.numpy(), sparse["fc1"]["weight"], bias=params["fc1"]["bias"]))
    y = hinm_jax.sparse_matmul(h, sparse["fc2"]["weight"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    img = torch.randn(2, 4, 9, 9)
    ref = net.conv(img).detach().numpy().transpose(0, 2, 3, 1)
    spec = layers.ConvSpec((3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1))
    y = layers.conv(img.numpy().transpose(0, 2, 3, 1), sparse["conv"]["weight"], params["conv"]["bias"], spec=spec)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    # the masked torch weights are what to_torch returns for the sparse tree
    back = interop.to_torch(sparse, module=net)
    assert torch.equal(back["fc1.weight"], net.fc1.weight.detach())
    assert torch.equal(back["conv.weight"], net.conv.weight.detach())


def test_errors_name_the_tensor():
    sd = {"blocks.0.proj.weight": np.zeros((8, 4, 3), np.float32)}
    with pytest.raises(ValueError, match=r"^blocks\.0\.proj\.weight: shape=\(8, 4, 3\): a linear weight must be 2-D"):
        interop.from_torch(sd, layouts={r"proj": "linear"})
    with pytest.raises(ValueError, match=r"^blocks\.0\.proj\.weight: layout 'dense'"):
        interop.from_torch(sd, layouts={r"proj": "dense"})
    with pytest.raises(ValueError, match=r"^a\.b\.c: another tensor is named by its prefix"):
        interop.from_torch({"a.b": np.zeros(2), "a.b.c": np.zeros(2)})
