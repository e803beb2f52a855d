"""The two sparse backends compute the same function: the same weights (MinkowskiEngine's, moved
into spconv's layout by lift3d.nets.convert), the same voxels, the same outputs and gradients.

Each layer kind is checked against MinkowskiEngine and, for the convolutions, against a dense
``torch.nn.functional`` computation written here; then whole networks. The voxels come from
points quantised at a voxel size (several points per voxel: duplicate coordinates), spread over
two batch items, with negative coordinates and isolated voxels that have no neighbour at any stride.

Tolerance: max |spconv - reference| <= TOL x max |reference| (float32 sums in another order):
TOL_LAYER = 1e-5 for single layers, TOL_NET = 1e-4 for whole networks (forward, the gradient of
the input features and every parameter gradient; batch norm in training mode divides by small
per-batch deviations, which scales rounding up).
"""

import pytest
import torch
import torch.nn.functional as F

ME = pytest.importorskip("MinkowskiEngine")
pytest.importorskip("spconv")

from lift3d.nets import res16unet as me_nets  # noqa: E402
from lift3d.nets import res16unet_spconv as sp_nets  # noqa: E402
from lift3d.nets.convert import minkowski_to_spconv, spconv_to_minkowski  # noqa: E402
from lift3d.nets.sparse import build_model, sparse_input, weights_for  # noqa: E402

spconv = sp_nets.spconv
torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # MinkowskiEngine's autograd Functions

TOL_LAYER = 1e-5
TOL_NET = 1e-4


def assert_close(got, want, tol, what=""):
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3g} vs tolerance {tol} x {scale:.3g}"


def voxels(n_points=600, seed=0, channels=3, extent=2.0, voxel=0.25):
    """Points of two batch items quantised at ``voxel`` (floor): (coords (M, 4) int32 with
    duplicates, feats (M, channels)); plus, per item, three isolated voxels 40 cells away from
    everything (and from each other), one of them at negative coordinates."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(2):
        xyz = (torch.rand(n_points // 2, 3, generator=g) - 0.4) * extent
        q = torch.floor(xyz / voxel).long()
        far = torch.tensor([[40, 0, 0], [0, -40, 3], [-41, 41, -40]]) + b
        rows.append(torch.cat([torch.full((len(q) + 3, 1), b), torch.cat([q, far])], 1))
    coords = torch.cat(rows).int()
    perm = torch.randperm(len(coords), generator=g)
    coords = coords[perm]
    feats = torch.randn(len(coords), channels, generator=g)
    uniq = torch.unique(coords, dim=0)
    assert len(uniq) < len(coords), "the fixture must hold duplicate coordinates"
    return coords, feats


def unique_first(coords, feats):
    """Independent dedup: the first row of each coordinate, in first-occurrence order."""
    seen, keep = set(), []
    for i, c in enumerate(map(tuple, coords.tolist())):
        if c not in seen:
            seen.add(c)
            keep.append(i)
    keep = torch.tensor(keep)
    return coords[keep], feats[keep]


def dense_grid(coords, feats, origin, shape):
    """(B, C, X, Y, Z) grid holding ``feats`` at ``coords - origin`` (unique coords)."""
    B = int(coords[:, 0].max()) + 1
    g = torch.zeros(B, feats.shape[1], *shape, dtype=feats.dtype)
    c = coords.long()
    r = c[:, 1:] - origin
    g[c[:, 0], :, r[:, 0], r[:, 1], r[:, 2]] = feats
    return g


def at(grid, coords, origin, stride=1):
    """Rows of ``grid`` (B, C, ...) at the voxels ``coords`` (units of the finest grid)."""
    c = coords.long()
    r = torch.div(c[:, 1:] - origin, stride, rounding_mode="floor")
    return grid[c[:, 0], :, r[:, 0], r[:, 1], r[:, 2]]


def me_kernel_to_conv3d(kernel, K):
    """MinkowskiEngine (K^3, in, out), offset index a + K b + K^2 c -> conv3d (out, in, K, K, K)."""
    w = torch.empty(kernel.shape[2], kernel.shape[1], K, K, K, dtype=kernel.dtype)
    for k in range(K**3):
        w[:, :, k % K, (k // K) % K, k // (K * K)] = kernel[k].t()
    return w


def by_coords(coords, feats):
    """{coordinate tuple: feature row}."""
    return {tuple(c): f for c, f in zip(coords.tolist(), feats)}


def spconv_coords(t, origin, stride):
    """A SparseConvTensor's voxels in MinkowskiEngine's units (b, x, y, z)."""
    i = t.indices.long()
    return torch.cat([i[:, :1], i[:, 1:] * stride + origin], 1)


def load_me_into_spconv(sp_mod, me_mod):
    sd = minkowski_to_spconv({f"m.{k}": v for k, v in me_mod.state_dict().items()})
    sp_mod.load_state_dict({k[2:]: v for k, v in sd.items()})


def grads_me_layout(sp_mod):
    return spconv_to_minkowski({k: p.grad for k, p in sp_mod.named_parameters()})


# ----------------------------------------------------------------------------- input handling


def test_duplicates_keep_the_first_row_in_first_occurrence_order():
    coords, feats = voxels()
    uc, uf = unique_first(coords, feats)
    st, kept, origin = sp_nets.sparse_conv_tensor(coords, feats)
    assert torch.equal(kept, uc)
    assert torch.equal(st.features, uf)
    assert torch.equal(spconv_coords(st, origin, 1), uc.long())
    assert (origin % 16 == 0).all() and (st.indices[:, 1:] >= 0).all()
    me_x = ME.SparseTensor(feats, coordinates=coords)  # the other library's quantisation
    assert torch.equal(me_x.C, uc) and torch.equal(me_x.F, uf)


# ----------------------------------------------------------------------------- each layer kind


def test_submanifold_conv_k3_forward_and_gradients():
    torch.manual_seed(1)
    coords, feats = voxels(channels=4)
    me = ME.MinkowskiConvolution(4, 5, kernel_size=3, stride=1, bias=False, dimension=3)
    sp = spconv.SubMConv3d(4, 5, 3, bias=False)
    load_me_into_spconv(sp, me)
    fm, fs = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ym = me(ME.SparseTensor(fm, coordinates=coords))
    st, kept, origin = sp_nets.sparse_conv_tensor(coords, fs)
    ys = sp(st)
    assert_close(ys.features, ym.F, TOL_LAYER, "forward vs MinkowskiEngine")
    # dense reference: conv3d with padding 1, read at the input's own voxels
    uc, uf = unique_first(coords, feats)
    shape = [int(v) for v in st.spatial_shape]
    ref = F.conv3d(dense_grid(uc, uf, origin, shape), me_kernel_to_conv3d(me.kernel.detach(), 3), padding=1)
    assert_close(ys.features, at(ref, uc, origin), TOL_LAYER, "forward vs dense conv3d")
    w = torch.randn(ym.F.shape, generator=torch.Generator().manual_seed(2))
    (ym.F * w).sum().backward()
    (ys.features * w).sum().backward()
    assert_close(fs.grad, fm.grad, TOL_LAYER, "input gradient")
    assert_close(grads_me_layout(sp)["kernel"], me.kernel.grad, TOL_LAYER, "kernel gradient")


def test_strided_conv_k2s2_forward_and_gradients():
    torch.manual_seed(3)
    coords, feats = voxels(channels=4, seed=1)
    me = ME.MinkowskiConvolution(4, 6, kernel_size=2, stride=2, bias=False, dimension=3)
    sp = spconv.SparseConv3d(4, 6, 2, stride=2, bias=False)
    load_me_into_spconv(sp, me)
    fm, fs = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ym = me(ME.SparseTensor(fm, coordinates=coords))
    st, kept, origin = sp_nets.sparse_conv_tensor(coords, fs)
    ys = sp(st)
    got, want = by_coords(spconv_coords(ys, origin, 2), ys.features), by_coords(ym.C, ym.F)
    assert set(got) == set(want), "the strided outputs sit on other voxels"
    keys = sorted(want)
    assert_close(torch.stack([got[k] for k in keys]), torch.stack([want[k] for k in keys]), TOL_LAYER, "forward")
    uc, uf = unique_first(coords, feats)
    shape = [int(v) for v in st.spatial_shape]
    ref = F.conv3d(dense_grid(uc, uf, origin, shape), me_kernel_to_conv3d(me.kernel.detach(), 2), stride=2)
    assert_close(ys.features, at(ref, spconv_coords(ys, origin, 2), origin, 2), TOL_LAYER, "forward vs dense")
    w = torch.randn(len(keys), 6, generator=torch.Generator().manual_seed(4))
    wd = dict(zip(keys, w))
    (ym.F * torch.stack([wd[k] for k in map(tuple, ym.C.tolist())])).sum().backward()
    (ys.features * torch.stack([wd[k] for k in map(tuple, spconv_coords(ys, origin, 2).tolist())])).sum().backward()
    assert_close(fs.grad, fm.grad, TOL_LAYER, "input gradient")
    assert_close(grads_me_layout(sp)["kernel"], me.kernel.grad, TOL_LAYER, "kernel gradient")


def test_transposed_conv_k2s2_back_onto_the_encoder_voxels():
    torch.manual_seed(5)
    coords, feats = voxels(channels=4, seed=2)
    down_me = ME.MinkowskiConvolution(4, 6, kernel_size=2, stride=2, bias=False, dimension=3)
    up_me = ME.MinkowskiConvolutionTranspose(6, 3, kernel_size=2, stride=2, bias=False, dimension=3)
    down_sp = spconv.SparseConv3d(4, 6, 2, stride=2, bias=False, indice_key="down1")
    up_sp = spconv.SparseInverseConv3d(6, 3, 2, bias=False, indice_key="down1")
    load_me_into_spconv(down_sp, down_me)
    load_me_into_spconv(up_sp, up_me)
    fm, fs = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    xm = ME.SparseTensor(fm, coordinates=coords)
    zm = up_me(down_me(xm))
    st, kept, origin = sp_nets.sparse_conv_tensor(coords, fs)
    mid = down_sp(st)
    zs = up_sp(mid)
    assert torch.equal(zm.C, kept) and torch.equal(zs.indices, st.indices), "not back on the encoder's voxels"
    assert_close(zs.features, zm.F, TOL_LAYER, "forward")
    # dense reference: conv_transpose3d of the strided output, read at the encoder's voxels
    mid_c = spconv_coords(mid, origin, 2)
    half = [int(v) // 2 for v in st.spatial_shape]
    grid = torch.zeros(2, 6, *half)
    r = torch.div(mid_c[:, 1:] - origin, 2, rounding_mode="floor")
    grid[mid_c[:, 0], :, r[:, 0], r[:, 1], r[:, 2]] = mid.features.detach()
    ref = F.conv_transpose3d(grid, me_kernel_to_conv3d(up_me.kernel.detach(), 2).transpose(0, 1), stride=2)
    assert_close(zs.features, at(ref, kept, origin), TOL_LAYER, "forward vs dense conv_transpose3d")
    w = torch.randn(zm.F.shape, generator=torch.Generator().manual_seed(6))
    (zm.F * w).sum().backward()
    (zs.features * w).sum().backward()
    assert_close(fs.grad, fm.grad, TOL_LAYER, "input gradient")
    assert_close(grads_me_layout(up_sp)["kernel"], up_me.kernel.grad, TOL_LAYER, "transposed kernel gradient")
    assert_close(grads_me_layout(down_sp)["kernel"], down_me.kernel.grad, TOL_LAYER, "strided kernel gradient")


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(training):
    torch.manual_seed(7)
    coords, feats = voxels(channels=6, seed=3)
    feats = feats * 3 + 1
    me = ME.MinkowskiBatchNorm(6, momentum=0.1)
    sp = sp_nets.SparseBatchNorm(6, momentum=0.1)
    with torch.no_grad():
        me.bn.weight.uniform_(0.5, 1.5)
        me.bn.bias.normal_()
        me.bn.running_mean.normal_()
        me.bn.running_var.uniform_(0.5, 2.0)
    sp.load_state_dict(me.state_dict())
    me.train(training)
    sp.train(training)
    fm, fs = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ym = me(ME.SparseTensor(fm, coordinates=coords))
    st, _, _ = sp_nets.sparse_conv_tensor(coords, fs)
    ys = sp(st)
    assert_close(ys.features, ym.F, TOL_LAYER, "forward")
    uc, uf = unique_first(coords, feats)
    if training:  # per-batch statistics over the unique voxels, biased variance
        ref = (uf - uf.mean(0)) / torch.sqrt(uf.var(0, unbiased=False) + 1e-5)
    else:
        ref = (uf - me.bn.running_mean) / torch.sqrt(me.bn.running_var + 1e-5)
    ref = ref * me.bn.weight.detach() + me.bn.bias.detach()
    assert_close(ys.features, ref, TOL_LAYER, "forward vs the formula")
    w = torch.randn(ym.F.shape, generator=torch.Generator().manual_seed(8))
    (ym.F * w).sum().backward()
    (ys.features * w).sum().backward()
    assert_close(fs.grad, fm.grad, TOL_LAYER, "input gradient")
    assert_close(sp.bn.weight.grad, me.bn.weight.grad, TOL_LAYER, "weight gradient")
    assert_close(sp.bn.running_mean, me.bn.running_mean, TOL_LAYER, "running mean")
    assert_close(sp.bn.running_var, me.bn.running_var, TOL_LAYER, "running variance")


@pytest.mark.parametrize("project", [True, False])
def test_residual_block(project):
    torch.manual_seed(9)
    cin, cout = (4, 6) if project else (6, 6)
    coords, feats = voxels(channels=cin, seed=4)
    down_me = down_sp = None
    if project:
        down_me = torch.nn.Sequential(
            ME.MinkowskiConvolution(cin, cout, kernel_size=1, dimension=3), ME.MinkowskiBatchNorm(cout)
        )
        down_sp = torch.nn.Sequential(sp_nets._subm(cin, cout, 1, 0), sp_nets.SparseBatchNorm(cout))
    me = me_nets.BasicBlock(cin, cout, downsample=down_me)
    sp = sp_nets.BasicBlock(cin, cout, 0, downsample=down_sp)
    with torch.no_grad():
        for m in me.modules():
            if isinstance(m, ME.MinkowskiBatchNorm):
                m.bn.weight.uniform_(0.5, 1.5)
                m.bn.bias.normal_()
    load_me_into_spconv(sp, me)
    assert sum(p.numel() for p in sp.parameters()) == sum(p.numel() for p in me.parameters())
    fm, fs = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ym = me(ME.SparseTensor(fm, coordinates=coords))
    st, _, _ = sp_nets.sparse_conv_tensor(coords, fs)
    ys = sp(st)
    assert_close(ys.features, ym.F, TOL_LAYER, "forward")
    assert (ys.features >= 0).all() and (ys.features == 0).any()  # the closing ReLU acted
    w = torch.randn(ym.F.shape, generator=torch.Generator().manual_seed(10))
    (ym.F * w).sum().backward()
    (ys.features * w).sum().backward()
    assert_close(fs.grad, fm.grad, TOL_LAYER, "input gradient")
    gs = grads_me_layout(sp)
    for k, p in me.named_parameters():
        assert_close(gs[k], p.grad, TOL_LAYER, f"gradient of {k}")


# ----------------------------------------------------------------------------- whole networks


@pytest.mark.parametrize("name", ["Res16UNet14A", "Res16UNet34C"])
def test_whole_network_forward_and_gradients(name):
    torch.manual_seed(11)
    me = build_model(name, 3, 8)
    sp = build_model(name, 3, 8, backend="spconv")
    assert sum(p.numel() for p in sp.parameters()) == sum(p.numel() for p in me.parameters())
    with torch.no_grad():  # batch norms away from 1 / 0, so that every parameter matters
        for m in me.modules():
            if isinstance(m, ME.MinkowskiBatchNorm):
                m.bn.weight.uniform_(0.5, 1.5)
                m.bn.bias.uniform_(-0.2, 0.2)
    sp.load_state_dict(weights_for(sp, me.state_dict(), "minkowski"))
    coords, feats = voxels(n_points=500, seed=5)
    me.train()
    sp.train()
    fm, fs = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ym, dm = me(sparse_input(fm, coords, "minkowski"), return_decoder=True)
    ys, ds = sp(sparse_input(fs, coords, "spconv"), return_decoder=True)
    assert torch.equal(ys.C, ym.C) and torch.equal(ds.C, dm.C)
    assert_close(ys.F, ym.F, TOL_NET, "final features")
    assert_close(ds.F, dm.F, TOL_NET, "decoder features")
    w = torch.randn(ym.F.shape, generator=torch.Generator().manual_seed(12))
    (ym.F * w).sum().backward()
    (ys.F * w).sum().backward()
    assert_close(fs.grad, fm.grad, TOL_NET, "input gradient")
    gs = grads_me_layout(sp)
    for k, p in me.named_parameters():
        assert_close(gs[k], p.grad, TOL_NET, f"gradient of {k}")
    for k, b in me.named_buffers():  # batch-norm statistics after the training-mode pass
        assert_close(dict(sp.named_buffers())[k].float(), b.float(), TOL_NET, k)
    me.eval()
    sp.eval()
    with torch.no_grad():
        assert_close(sp(sparse_input(feats, coords, "spconv")).F, me(sparse_input(feats, coords)).F, TOL_NET, "eval")


def test_normalize_feature_and_spconv_to_minkowski_direction():
    """Weights trained in spconv, moved to MinkowskiEngine: the same unit-norm features."""
    torch.manual_seed(13)
    sp = build_model("Res16UNet14", 3, 6, backend="spconv", normalize_feature=True).eval()
    me = build_model("Res16UNet14", 3, 6, normalize_feature=True).eval()
    me.load_state_dict(weights_for(me, sp.state_dict(), "spconv"))
    coords, feats = voxels(n_points=300, seed=6)
    with torch.no_grad():
        ys, ym = sp(sparse_input(feats, coords, "spconv")), me(sparse_input(feats, coords))
    assert_close(ys.F, ym.F, TOL_NET, "features")
    torch.testing.assert_close(ys.F.norm(dim=1), torch.ones(len(ys.F)), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (spconv's GPU kernels)")
@pytest.mark.parametrize("name", ["Res16UNet14A", "Res16UNet34C"])
def test_whole_network_on_cuda_equals_minkowski(name):
    """spconv on the GPU against MinkowskiEngine on the CPU (and on the GPU where its build has CUDA)."""
    torch.manual_seed(14)
    me = build_model(name, 3, 8).train()
    sp = build_model(name, 3, 8, backend="spconv")
    sp.load_state_dict(weights_for(sp, me.state_dict(), "minkowski"))
    sp.cuda().train()
    coords, feats = voxels(n_points=2000, seed=7)
    fm, fs = feats.clone().requires_grad_(), feats.cuda().requires_grad_()
    ym = me(sparse_input(fm, coords))
    ys = sp(sparse_input(fs, coords.cuda(), "spconv"))
    tol = 1e-3  # GPU kernels sum in other orders
    assert torch.equal(ys.C.cpu(), ym.C)
    assert_close(ys.F, ym.F, tol, "final features")
    w = torch.randn(ym.F.shape, generator=torch.Generator().manual_seed(15))
    (ym.F * w).sum().backward()
    (ys.F * w.cuda()).sum().backward()
    assert_close(fs.grad, fm.grad, tol, "input gradient")
    gs = grads_me_layout(sp)
    for k, p in me.named_parameters():
        assert_close(gs[k], p.grad, tol, f"gradient of {k}")
    if ME.is_cuda_available():
        me_gpu = build_model(name, 3, 8).cuda().train()
        me_gpu.load_state_dict(me.state_dict())
        yg = me_gpu(sparse_input(feats.cuda(), coords.cuda()))
        assert_close(yg.F, ys.F, tol, "MinkowskiEngine on the GPU")
