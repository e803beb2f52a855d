"""The spconv backend's plumbing: the state-dict converter on every registered network, the
backend dispatch, and the two guards spconv 2.3.8 needs on the CPU (the CUDA-stream lookup of
its backward pass, and one OpenMP thread per CPU operation)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ME = pytest.importorskip("MinkowskiEngine")
pytest.importorskip("spconv")

from lift3d.nets import res16unet as me_nets  # noqa: E402
from lift3d.nets import res16unet_spconv as sp_nets  # noqa: E402
from lift3d.nets import sparse  # noqa: E402
from lift3d.nets.convert import convert_state_dict, minkowski_to_spconv, spconv_to_minkowski  # noqa: E402

spconv = sp_nets.spconv
torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("name", sorted(me_nets.MODELS))
def test_every_network_has_the_same_parameters_in_both_backends(name):
    """Key for key (after renaming), shape for shape (after the layout change), same count."""
    me = sparse.build_model(name, 3, 13)
    sp = sparse.build_model(name, 3, 13, backend="spconv")
    me_sd, sp_sd = me.state_dict(), sp.state_dict()
    assert sum(p.numel() for p in me.parameters()) == sum(p.numel() for p in sp.parameters())
    conv = minkowski_to_spconv(me_sd)
    assert list(conv) == list(sp_sd)  # the same keys in the same (registration) order
    assert {k: tuple(v.shape) for k, v in conv.items()} == {k: tuple(v.shape) for k, v in sp_sd.items()}
    sp.load_state_dict(conv)
    back = spconv_to_minkowski(sp.state_dict())
    assert list(back) == list(me_sd)
    for k, v in me_sd.items():  # exact both ways
        assert torch.equal(back[k], v), k


def test_converter_layout_by_hand():
    """One kernel entry and one 1x1 entry, placed by hand (MinkowskiEngine k = a + 3 b + 9 c)."""
    kernel = torch.zeros(27, 2, 4)
    a, b, c = 2, 0, 1
    kernel[a + 3 * b + 9 * c, 1, 3] = 5.0
    w = minkowski_to_spconv({"conv.kernel": kernel})["conv.weight"]
    assert w.shape == (4, 3, 3, 3, 2)
    assert w[3, a, b, c, 1] == 5.0 and w.abs().sum() == 5.0
    # spconv's 1x1 convolution is features @ weight.view(in, out)
    m = torch.arange(6.0).reshape(2, 3)  # (in, out)
    sd = minkowski_to_spconv({"final.kernel": m, "final.bias": torch.ones(1, 3)})
    assert sd["final.weight"].shape == (3, 1, 1, 1, 2) and sd["final.bias"].shape == (3,)
    assert torch.equal(sd["final.weight"].view(2, 3), m)
    # non-convolution keys pass through untouched, whatever their names
    other = {"head3d.linear.weight": torch.ones(2, 3), "upl.conv.weight": torch.ones(4, 5, 1, 1)}
    assert all(torch.equal(minkowski_to_spconv(other)[k], v) for k, v in other.items())
    assert all(torch.equal(spconv_to_minkowski(other)[k], v) for k, v in other.items())


def test_convert_state_dict_refuses_unknown_backends_and_non_cubes():
    with pytest.raises(ValueError, match="unknown sparse backend 'torchsparse'"):
        convert_state_dict({}, "minkowski", "torchsparse")
    with pytest.raises(ValueError, match="not a cube"):
        minkowski_to_spconv({"c.kernel": torch.zeros(10, 2, 2)})


def test_dispatch():
    assert sparse.check_backend(None) == "minkowski"
    with pytest.raises(ValueError, match="pretrain.sparse_backend: unknown sparse backend 'torch'"):
        sparse.check_backend("torch", "pretrain.sparse_backend")
    net = sparse.build_model("Res16UNet14A", 3, 4, backend="spconv")
    assert sparse.backend_of(net) == "spconv" and sparse.backend_of(sparse.build_model("Res16UNet14A", 3, 4)) == (
        "minkowski"
    )
    assert sparse.checkpoint_backend({}) == "minkowski" and sparse.checkpoint_backend({"backend": "spconv"}) == "spconv"
    x = sparse.sparse_input(torch.zeros(2, 3), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32), "spconv")
    assert isinstance(x, sp_nets.Voxels)
    with pytest.raises(ValueError, match="3 input channels|\\(M, 3\\) features"):
        net(sp_nets.Voxels(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 5)))


def test_stream_guard(monkeypatch):
    """Every spconv binding of get_current_stream is the guard; it answers the null stream without
    CUDA and asks torch's CUDA stream (spconv's own lookup) when CUDA is there."""
    import spconv.pytorch.hash as sp_hash
    import spconv.pytorch.ops as sp_ops

    assert sp_ops.get_current_stream is sp_nets._current_stream
    assert sp_hash.get_current_stream is sp_nets._current_stream
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sp_nets._current_stream() == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sp_nets, "_ORIGINAL_STREAM", lambda: 1234)
    assert sp_nets._current_stream() == 1234


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard's case is a torch without CUDA")
def test_cpu_backward_runs_without_cuda():
    """spconv's CPU backward (it asks for a CUDA stream) runs, and its gradient is the dense one."""
    g = torch.Generator().manual_seed(0)
    coords = torch.unique(torch.randint(0, 6, (120, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    feats = torch.randn(len(coords), 2, generator=g, dtype=torch.float32).requires_grad_()
    conv = spconv.SubMConv3d(2, 3, 3, bias=False)
    st = spconv.SparseConvTensor(feats, coords, [6, 6, 6], 1)
    conv(st).features.square().sum().backward()  # raised "Found no NVIDIA driver" without the guard
    dense = torch.zeros(1, 2, 6, 6, 6)
    c = coords.long()
    leaf = feats.detach().clone().requires_grad_()
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = leaf
    ref = F.conv3d(dense, conv.weight.detach().permute(0, 4, 1, 2, 3), padding=1)
    ref[:, :, c[:, 1], c[:, 2], c[:, 3]].square().sum().backward()
    torch.testing.assert_close(feats.grad, leaf.grad, rtol=1e-5, atol=1e-5)


CHILD = """
import torch, torch.nn.functional as F
import lift3d.nets.res16unet_spconv as R
torch.set_num_threads(2)
g, wrong = torch.Generator().manual_seed(1), 0
for trial in range(20):
    b = torch.randint(0, 2, (360, 1), generator=g)
    coords = torch.unique(torch.cat([b, torch.randint(0, 10, (360, 3), generator=g)], 1), dim=0).int()
    feats = torch.randn(len(coords), 32, generator=g)
    conv = R.spconv.SparseConv3d(32, 64, 2, 2, bias=False)
    out = conv(R.spconv.SparseConvTensor(feats, coords, [16, 16, 16], 2))
    assert torch.get_num_threads() == 2  # restored after each operation
    dense = torch.zeros(2, 32, 16, 16, 16)
    c = coords.long()
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
    ref = F.conv3d(dense, conv.weight.detach().permute(0, 4, 1, 2, 3), stride=2)
    o = out.indices.long()
    wrong += int((out.features.detach() - ref[o[:, 0], :, o[:, 1], o[:, 2], o[:, 3]]).abs().max() > 1e-4)
print("WRONG", wrong)
"""


def test_cpu_operations_are_right_with_several_torch_threads():
    """With two torch threads (and OpenMP's default count, as in a process started without
    OMP_NUM_THREADS) spconv 2.3.8's CPU convolutions sum some voxels wrongly: two OpenMP runtimes
    mixed. Under the guard twenty strided convolutions all equal the dense conv3d. A child process,
    since this suite pins OMP_NUM_THREADS=1."""
    import spconv.pytorch.ops as sp_ops

    assert all(getattr(sp_ops, n).lift3d_guarded for n in ("indice_conv", "indice_conv_backward", "get_indice_pairs"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "WRONG 0" in res.stdout, res.stdout
