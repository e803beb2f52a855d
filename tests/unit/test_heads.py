"""Heads: projection head, PPKT's UPL (sparse sampling vs the dense upsampled map, and a
hand-worked cell-to-pixel example), segmentation head."""

import math

import pytest
import torch
import torch.nn.functional as F

from lift3d.nets.heads import UPL, ProjectionHead3D, SegHead

torch.set_num_threads(1)


def test_projection_head_linear_then_unit_norm():
    torch.manual_seed(0)
    head = ProjectionHead3D(5, 3)
    x = torch.randn(4, 5)
    out = head(x).detach()
    W, b = head.linear.weight.detach(), head.linear.bias.detach()
    for i in range(4):
        y = [sum(float(W[o, c]) * float(x[i, c]) for c in range(5)) + float(b[o]) for o in range(3)]
        norm = math.sqrt(sum(v * v for v in y))
        for o in range(3):
            assert abs(float(out[i, o]) - y[o] / norm) < 1e-5


def test_projection_head_accepts_sparse_tensor():
    ME = pytest.importorskip("MinkowskiEngine")
    torch.manual_seed(0)
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 2, 1]], dtype=torch.int32)
    feats = torch.randn(3, 6)
    st = ME.SparseTensor(feats, coordinates=coords)
    head = ProjectionHead3D(6, 4)
    torch.testing.assert_close(head(st), head(st.F))
    seg = SegHead(6, 9)
    torch.testing.assert_close(seg(st), seg(st.F))


def dense_reference(upl, maps, frame_idx, pixels, H, W):
    """PPKT as written: 1x1 conv, F.interpolate to (H, W), then index the pixels, L2 norm."""
    y = F.conv2d(maps.float(), upl.conv.weight, upl.conv.bias)
    y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
    y = y[frame_idx, :, pixels[:, 0], pixels[:, 1]]
    return F.normalize(y, dim=1)


@pytest.mark.parametrize(
    "h,w,H,W", [(7, 9, 60, 80), (4, 5, 16, 20), (6, 8, 6, 8), (5, 3, 17, 29), (12, 10, 5, 7), (1, 1, 4, 6)]
)
def test_upl_sample_equals_dense(h, w, H, W):
    torch.manual_seed(h * 100 + w)
    N, C, D = 3, 6, 4
    upl = UPL(C, D)
    maps = torch.randn(N, C, h, w)
    # every pixel of every frame for small images, a random subset for the large one
    rr, cc = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    pix = torch.stack([rr.flatten(), cc.flatten()], 1).repeat(N, 1)
    fidx = torch.arange(N).repeat_interleave(H * W)
    if len(pix) > 3000:
        sel = torch.randperm(len(pix))[:3000]
        pix, fidx = pix[sel], fidx[sel]
    got = upl.sample(maps, fidx, pix, (H, W))
    ref = dense_reference(upl, maps, fidx, pix, H, W)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(upl.dense(maps, (H, W))[fidx, :, pix[:, 0], pix[:, 1]], ref, rtol=0, atol=1e-5)


def test_upl_gradient_equals_dense_gradient():
    torch.manual_seed(0)
    upl = UPL(5, 3)
    maps = torch.randn(2, 5, 7, 9)
    pix = torch.stack([torch.randint(0, 60, (50,)), torch.randint(0, 80, (50,))], 1)
    fidx = torch.randint(0, 2, (50,))
    g = torch.randn(50, 3)
    (upl.sample(maps, fidx, pix, (60, 80)) * g).sum().backward()
    grads = [p.grad.clone() for p in upl.parameters()]
    upl.zero_grad()
    (dense_reference(upl, maps, fidx, pix, 60, 80) * g).sum().backward()
    for a, p in zip(grads, upl.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_upl_hand_worked_cell_to_pixel_mapping():
    """h=2 cells over H=6 rows: cell i covers pixel centre (i + 0.5) * 3 - 0.5, so pixels 1 and 4
    take cell 0 and cell 1 exactly; pixel 0 is clamped to cell 0; pixel 2 sits 1/3 of the way
    from cell 0 (at 1) to cell 1 (at 4); pixel 5 is clamped to cell 1. One column (w = W = 1)."""
    upl = UPL(2, 2, bias=False)
    with torch.no_grad():
        upl.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    a, b = 3.0, 9.0
    maps = torch.tensor([[[[a], [b]], [[1.0], [1.0]]]])  # channel 0: a, b; channel 1: ones
    pix = torch.tensor([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0]])
    got = upl.sample(maps, torch.zeros(6, dtype=torch.long), pix, (6, 1)).detach()
    expected_v = [a, a, a + (b - a) / 3, a + 2 * (b - a) / 3, b, b]
    for r, v in enumerate(expected_v):
        n = math.hypot(v, 1.0)
        assert abs(float(got[r, 0]) - v / n) < 1e-6
        assert abs(float(got[r, 1]) - 1.0 / n) < 1e-6


def test_upl_accepts_float16_cache_and_rejects_bad_shapes():
    torch.manual_seed(0)
    upl = UPL(4, 3)
    maps = torch.randn(2, 4, 5, 6)
    pix = torch.tensor([[0, 0], [10, 17], [19, 23]])
    fidx = torch.tensor([0, 1, 1])
    half = upl.sample(maps.half(), fidx, pix, (20, 24))
    full = upl.sample(maps.half().float(), fidx, pix, (20, 24))
    torch.testing.assert_close(half, full)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError):
        upl.sample(torch.randn(2, 5, 5, 6), fidx, pix, (20, 24))
    with pytest.raises(ValueError):
        upl.sample(maps, fidx[:2], pix, (20, 24))


def test_seg_head_is_per_point_linear():
    torch.manual_seed(0)
    head = SegHead(4, 7)
    x = torch.randn(10, 4)
    out = head(x)
    assert out.shape == (10, 7)
    ref = x @ head.linear.weight.t() + head.linear.bias
    torch.testing.assert_close(out, ref)
    # per-point: a point's logits do not depend on the other points
    torch.testing.assert_close(head(x[3:4]), out[3:4])
