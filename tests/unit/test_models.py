"""Sparse U-Nets: layers against dense torch computations, every registered network end to end,
and the PointContrast export against the independently enumerated manifest."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

ME = pytest.importorskip("MinkowskiEngine")

from lift3d.nets.res16unet import (  # noqa: E402
    MODELS,
    BasicBlock,
    Res16UNet34C,
    build_model,
    export_pointcontrast,
    load_pointcontrast,
)
from tests.fixtures import POINTCONTRAST_MANIFEST  # noqa: E402

torch.set_num_threads(1)
# MinkowskiEngine 0.5.4 instantiates autograd Functions, which torch deprecates; not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MANIFEST = POINTCONTRAST_MANIFEST


# --- helpers: dense <-> sparse on fully occupied grids ---------------------------------------


def full_grid(batch, X, Y, Z):
    """Coordinates (b, x, y, z) of every cell of `batch` X x Y x Z grids."""
    b, x, y, z = torch.meshgrid(torch.arange(batch), torch.arange(X), torch.arange(Y), torch.arange(Z), indexing="ij")
    return torch.stack([b, x, y, z], -1).reshape(-1, 4).int()


def sparse_from_dense(dense):
    """SparseTensor holding every cell of a dense (B, C, X, Y, Z) tensor."""
    B, C, X, Y, Z = dense.shape
    coords = full_grid(B, X, Y, Z)
    feats = dense[coords[:, 0].long(), :, coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()]
    return ME.SparseTensor(feats.contiguous(), coordinates=coords)


def dense_from_sparse(st, shape):
    """Scatter a SparseTensor into a dense (B, C, X, Y, Z) tensor (coordinates / tensor stride)."""
    out = torch.full(shape, float("nan"), dtype=st.F.dtype)
    c = st.C.long()
    s = torch.tensor(st.tensor_stride, dtype=torch.long)
    idx = c[:, 1:] // s
    out[c[:, 0], :, idx[:, 0], idx[:, 1], idx[:, 2]] = st.F
    return out


def me_kernel_to_torch(kernel, K):
    """ME kernel (K^3, in, out) -> torch conv3d weight (out, in, K, K, K).

    ME enumerates kernel offsets with x fastest: index k = a + K b + K^2 c is the offset
    (a, b, c) - (K-1)/2 for odd K (0-based (a, b, c) for even K), and computes the
    cross-correlation out[u] = sum_k x[u + offset_k] @ W_k -- conv3d's weight[:, :, a, b, c]."""
    kv, cin, cout = kernel.shape
    assert kv == K**3
    w = torch.empty(cout, cin, K, K, K, dtype=kernel.dtype)
    for k in range(kv):
        a, b, c = k % K, (k // K) % K, k // (K * K)
        w[:, :, a, b, c] = kernel[k].t()
    return w


# --- layers against dense computations ------------------------------------------------------


def test_conv3x3x3_equals_dense_conv3d():
    torch.manual_seed(0)
    dense = torch.randn(2, 3, 4, 5, 3)
    conv = ME.MinkowskiConvolution(3, 4, kernel_size=3, stride=1, bias=True, dimension=3)
    with torch.no_grad():
        conv.kernel.normal_()
        conv.bias.normal_()
    out = conv(sparse_from_dense(dense))
    ref = F.conv3d(dense, me_kernel_to_torch(conv.kernel.detach(), 3), conv.bias.detach().view(-1), padding=1)
    got = dense_from_sparse(out, ref.shape)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_kernel_offset_order_single_impulse():
    """A unit impulse through a one-hot kernel k lands at centre - offset_k (x fastest)."""
    coords = full_grid(1, 3, 3, 3)
    centre = int(((coords[:, 1:] == 1).all(1)).nonzero())
    feats = torch.zeros(27, 1)
    feats[centre] = 1
    x = ME.SparseTensor(feats, coordinates=coords)
    conv = ME.MinkowskiConvolution(1, 1, kernel_size=3, dimension=3)
    for k in (0, 1, 3, 9, 13, 26):
        with torch.no_grad():
            conv.kernel.zero_()
            conv.kernel[k] = 1
        y = conv(x)
        hit = y.C[y.F[:, 0] != 0][:, 1:].tolist()
        offset = [k % 3 - 1, (k // 3) % 3 - 1, k // 9 - 1]
        assert hit == [[1 - offset[0], 1 - offset[1], 1 - offset[2]]]


def test_strided_conv_and_transpose_equal_dense():
    torch.manual_seed(1)
    dense = torch.randn(1, 2, 4, 4, 6)
    x = sparse_from_dense(dense)
    down = ME.MinkowskiConvolution(2, 3, kernel_size=2, stride=2, dimension=3)
    up = ME.MinkowskiConvolutionTranspose(3, 2, kernel_size=2, stride=2, dimension=3)
    y = down(x)
    assert y.tensor_stride == [2, 2, 2]
    ref_down = F.conv3d(dense, me_kernel_to_torch(down.kernel.detach(), 2), stride=2)
    torch.testing.assert_close(dense_from_sparse(y, ref_down.shape), ref_down, rtol=1e-5, atol=1e-5)
    z = up(y)
    assert z.tensor_stride == [1, 1, 1]
    # conv_transpose3d weight is (in, out, K, K, K): out[2u + i] += x[u] @ W_i.
    w_up = me_kernel_to_torch(up.kernel.detach(), 2).transpose(0, 1)
    ref_up = F.conv_transpose3d(ref_down, w_up, stride=2)
    torch.testing.assert_close(dense_from_sparse(z, ref_up.shape), ref_up, rtol=1e-5, atol=1e-5)


def test_basic_block_equals_dense():
    torch.manual_seed(2)
    dense = torch.randn(2, 4, 3, 4, 3)
    block = BasicBlock(
        4,
        6,
        downsample=torch.nn.Sequential(
            ME.MinkowskiConvolution(4, 6, kernel_size=1, dimension=3), ME.MinkowskiBatchNorm(6)
        ),
    )
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, ME.MinkowskiBatchNorm):
                m.bn.weight.uniform_(0.5, 1.5)
                m.bn.bias.normal_()
                m.bn.running_mean.normal_()
                m.bn.running_var.uniform_(0.5, 2.0)
    block.eval()
    out = block(sparse_from_dense(dense))

    def bn(t, m):
        return F.batch_norm(
            t, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, training=False, eps=m.bn.eps
        )

    with torch.no_grad():
        h = F.relu(bn(F.conv3d(dense, me_kernel_to_torch(block.conv1.kernel, 3), padding=1), block.norm1))
        h = bn(F.conv3d(h, me_kernel_to_torch(block.conv2.kernel, 3), padding=1), block.norm2)
        w_ds = block.downsample[0].kernel.t()[:, :, None, None, None]  # (in, out) -> 1x1x1
        res = bn(F.conv3d(dense, w_ds), block.downsample[1])
        ref = F.relu(h + res)
    torch.testing.assert_close(dense_from_sparse(out, ref.shape), ref, rtol=1e-4, atol=1e-5)


# --- registered networks --------------------------------------------------------------------


def random_sparse(n_per_batch=150, batch=2, extent=12, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b in range(batch):
        c = torch.unique(torch.randint(0, extent, (n_per_batch, 3), generator=g), dim=0)
        coords.append(torch.cat([torch.full((len(c), 1), b), c], 1))
    coords = torch.cat(coords).int()
    feats = torch.rand(len(coords), channels, generator=g)
    return coords, feats


EXPECTED_DIMS = {
    "Res16UNet14": 256,
    "Res16UNet14A": 96,
    "Res16UNet18": 256,
    "Res16UNet18A": 96,
    "Res16UNet34": 256,
    "Res16UNet34A": 64,
    "Res16UNet34C": 96,
}


def test_registry_contents():
    assert set(MODELS) == set(EXPECTED_DIMS)
    with pytest.raises(ValueError):
        build_model("NoSuchNet", 3, 8)


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_network_forward_backward(name):
    torch.manual_seed(0)
    coords, feats = random_sparse()
    net = build_model(name, 3, 7)
    assert net.feature_dim == 7 and net.decoder_dim == EXPECTED_DIMS[name]
    x = ME.SparseTensor(feats, coordinates=coords)
    out, dec = net(x, return_decoder=True)
    assert out.F.shape == (len(coords), 7)
    assert dec.F.shape == (len(coords), EXPECTED_DIMS[name])
    assert torch.equal(out.C, x.C) and torch.equal(dec.C, x.C)
    assert torch.isfinite(out.F).all()
    (out.F.square().mean() + dec.F.mean()).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_determinism_with_fixed_seed():
    # exact with one OpenMP thread (tests/conftest.py); with more, MinkowskiEngine sums in
    # another order and batch norm amplifies the last-bit differences
    coords, feats = random_sparse(seed=3)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = build_model("Res16UNet14A", 3, 5)
        init = {k: v.clone() for k, v in net.state_dict().items()}  # before BN statistics move
        out = net(ME.SparseTensor(feats, coordinates=coords))
        outs.append((init, out.F.detach().clone()))
    (sd_a, out_a), (sd_b, out_b) = outs
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(out_a, out_b)
    torch.manual_seed(124)
    other = build_model("Res16UNet14A", 3, 5).state_dict()
    assert not torch.equal(other["conv0p1s1.kernel"], sd_a["conv0p1s1.kernel"])


def test_normalize_feature_gives_unit_rows():
    coords, feats = random_sparse(n_per_batch=60, seed=4)
    torch.manual_seed(0)
    net = build_model("Res16UNet14", 3, 6, normalize_feature=True)
    out = net(ME.SparseTensor(feats, coordinates=coords)).F
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(out)))


# --- PointContrast interchange --------------------------------------------------------------


def test_export_matches_pointcontrast_manifest():
    manifest = json.loads(MANIFEST.read_text())
    assert manifest["model"] == "Res16UNet34C"
    entries = [(k, list(s)) for k, s in manifest["entries"]]
    # The manifest itself: 37.8 M parameters, as PointContrast's Res16UNet34C reports.
    n = sum(math.prod(s) for k, s in entries if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n == manifest["num_parameters"]

    torch.manual_seed(0)
    net = Res16UNet34C(
        manifest["in_channels"], manifest["out_channels"], conv1_kernel_size=manifest["conv1_kernel_size"]
    )
    wrapped = {"module." + k: v for k, v in net.state_dict().items()}
    exported = export_pointcontrast(wrapped)
    got = [(k, list(v.shape)) for k, v in exported.items()]
    assert got == entries
    assert sum(p.numel() for p in net.parameters()) == n


def test_export_drops_heads_and_load_roundtrip():
    torch.manual_seed(0)
    src = build_model("Res16UNet14A", 3, 8)
    sd = {"backbone." + k: v for k, v in src.state_dict().items()}
    sd["head.linear.weight"] = torch.zeros(4, 8)
    with pytest.raises(ValueError):
        export_pointcontrast({"head.linear.weight": torch.zeros(4, 8)})
    exported = export_pointcontrast(sd)
    assert "head.linear.weight" not in exported
    assert list(exported) == list(src.state_dict())
    dst = build_model("Res16UNet14A", 3, 20)  # another out_channels: final is skipped
    skipped = load_pointcontrast(dst, exported)
    assert sorted(skipped) == ["final.bias", "final.kernel"]
    dsd = dst.state_dict()
    for k, v in exported.items():
        if not k.startswith("final."):
            assert torch.equal(dsd[k], v), k
    with pytest.raises(ValueError):
        load_pointcontrast(build_model("Res16UNet14", 3, 8), exported)  # other widths
