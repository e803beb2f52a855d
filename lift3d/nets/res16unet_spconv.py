"""The Res16UNet family on spconv 2.x: the architecture of :mod:`lift3d.nets.res16unet`
(MinkowskiEngine), layer for layer, with the same module names and parameter count.

How each MinkowskiEngine layer maps (docs/backends.md proves each with a test):

- a stride-1 kernel-K convolution (K odd) writes onto its input's own coordinates: spconv's
  ``SubMConv3d`` (submanifold), cross-correlation over offsets ``-(K-1)/2 .. (K-1)/2``;
- the kernel-2 stride-2 convolution: ``SparseConv3d(kernel 2, stride 2)``; an output voxel
  ``o`` collects the input voxels ``2 o + (a, b, c)``, a, b, c in {0, 1} (MinkowskiEngine floors
  the coordinates to the next stride, spconv divides the grid indices: the same voxels);
- the kernel-2 stride-2 transposed convolution back onto the encoder's coordinates:
  ``SparseInverseConv3d`` keyed to the strided convolution it inverts (``indice_key``), so its
  output rows are those of that convolution's input;
- ``MinkowskiBatchNorm``: ``BatchNorm1d`` over the voxels' features, held as ``.bn`` (the same keys);
- 1x1 convolutions (the residual projections and ``final``): ``SubMConv3d(kernel 1)``.

Input: anything with ``C`` (M, 4) int batch-first coordinates ``(b, x, y, z)`` and ``F`` (M, in)
features — the batches of :mod:`lift3d.train.data` as :class:`Voxels`, or a MinkowskiEngine
SparseTensor. The network builds its ``SparseConvTensor`` itself: coordinates are shifted by a
multiple of 16 (the deepest stride, so the stride-2 grids fall where MinkowskiEngine's do, negative
coordinates included) and duplicates are dropped keeping the first occurrence, in the order of
first occurrence (what MinkowskiEngine's default quantisation does). Output: :class:`Voxels` on
those coordinates, rows in that order, like MinkowskiEngine's ``.C`` / ``.F``.

Weights: a convolution's ``weight`` is spconv's ``(out, K, K, K, in)``, axis 1 on the coordinate
column x; a 1x1 weight ``(out, 1, 1, 1, in)`` is used by spconv as its memory read as (in, out).
:mod:`lift3d.nets.convert` maps state dicts between the two libraries.

Two guards, installed on import (:func:`install_guards`), make spconv 2.3.8's CPU path usable:

- its CPU backward asks torch for the current CUDA stream, which fails on a torch without CUDA:
  the stream lookup answers the null stream there instead;
- its CPU kernels run OpenMP regions that mix two OpenMP runtimes (its own bundled libgomp and
  torch's): with torch's intra-op threads above one, convolutions sum some voxels wrongly, and not
  the same ones from call to call (seen with torch 2.14.1; MinkowskiEngine's CPU kernels raise
  that thread count again behind torch's back). Each spconv operation on CPU tensors therefore
  runs with ``torch.set_num_threads(1)``, restored afterwards (about a microsecond per call).
"""

from __future__ import annotations

import functools
import sys
from typing import Dict, Tuple, Type

import spconv.pytorch as spconv
import torch
import torch.nn as nn
import torch.nn.functional as F
from spconv import constants as sp_constants
from spconv.pytorch import cppcore as sp_cppcore
from spconv.pytorch import ops as sp_ops

from lift3d.nets.res16unet_arch import build, make_models

__all__ = [
    "BACKEND",
    "MAX_STRIDE",
    "Voxels",
    "sparse_conv_tensor",
    "SparseBatchNorm",
    "BasicBlock",
    "Res16UNetBase",
    "MODELS",
    "build_model",
    "install_guards",
]

BACKEND = "spconv"
MAX_STRIDE = 16  # the deepest tensor stride of the family (four stride-2 stages)

_ORIGINAL_STREAM = sp_cppcore.get_current_stream
# spconv.pytorch.ops' operations, called as ``ops.<name>`` by spconv's modules and autograd functions
_GUARDED_OPS = ("get_indice_pairs", "indice_", "implicit_gemm")


def _current_stream() -> int:
    """The current CUDA stream's handle, or 0 (the null stream) where torch has no CUDA: spconv
    reads a stream before taking its CPU path, which never uses it."""
    if torch.cuda.is_available():
        return _ORIGINAL_STREAM()
    return 0


def _one_thread_on_cpu(op):
    """``op`` run with one torch (OpenMP) thread when its first tensor argument is on the CPU."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cpu":
            return op(*args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # always: MinkowskiEngine may have raised OpenMP's count unseen
        try:
            return op(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    run.lift3d_guarded = True
    return run


def install_guards() -> int:
    """Install both guards (module docstring) on the loaded spconv modules: every binding of
    ``get_current_stream`` (imported by name, so each module's is replaced) and the CPU operations
    of ``spconv.pytorch.ops``. Returns how many bindings it replaced; idempotent."""
    n = 0
    for name, mod in list(sys.modules.items()):
        if (name == "spconv" or name.startswith("spconv.")) and getattr(mod, "get_current_stream", None) is (
            _ORIGINAL_STREAM
        ):
            mod.get_current_stream = _current_stream
            n += 1
    for name in dir(sp_ops):
        fn = getattr(sp_ops, name)
        if name.startswith(_GUARDED_OPS) and callable(fn) and not getattr(fn, "lift3d_guarded", False):
            setattr(sp_ops, name, _one_thread_on_cpu(fn))
            n += 1
    return n


install_guards()


class Voxels:
    """Batched voxels: ``C`` (M, 4) int coordinates ``(b, x, y, z)`` and ``F`` (M, channels)
    features, row for row (the attribute names of a MinkowskiEngine SparseTensor)."""

    __slots__ = ("C", "F")

    def __init__(self, coords: torch.Tensor, feats: torch.Tensor):
        self.C = coords
        self.F = feats

    def __repr__(self) -> str:
        return f"Voxels(C={tuple(self.C.shape)}, F={tuple(self.F.shape)})"


class SparseBatchNorm(nn.Module):
    """Batch norm over the voxels' features; ``.bn`` as in ``MinkowskiBatchNorm``."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels, eps=eps, momentum=momentum)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        return x.replace_feature(self.bn(x.features))


def _relu(x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
    # in place, as MinkowskiReLU(inplace=True): always applied to a batch norm's or a sum's fresh output
    return x.replace_feature(F.relu(x.features, inplace=True))


def _subm(cin: int, cout: int, k: int, level: int, bias: bool = False, dilation: int = 1) -> spconv.SubMConv3d:
    key = f"subm{level}k{k}d{dilation}" if k > 1 else None
    return spconv.SubMConv3d(cin, cout, k, stride=1, dilation=dilation, bias=bias, indice_key=key)


class BasicBlock(nn.Module):
    """Residual basic block: conv3-BN-ReLU-conv3-BN, plus (projected) identity, then ReLU."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        level: int,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        self.conv1 = _subm(inplanes, planes, 3, level, dilation=dilation)
        self.norm1 = SparseBatchNorm(planes, momentum=bn_momentum)
        self.conv2 = _subm(planes, planes, 3, level, dilation=dilation)
        self.norm2 = SparseBatchNorm(planes, momentum=bn_momentum)
        self.downsample = downsample

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        out = _relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return _relu(out.replace_feature(out.features + residual.features))


def _cat(a: spconv.SparseConvTensor, b: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
    """Features of ``a`` then ``b`` on the same voxels (``ME.cat``)."""
    return a.replace_feature(torch.cat([a.features, b.features], 1))


def sparse_conv_tensor(
    coords: torch.Tensor, feats: torch.Tensor
) -> Tuple[spconv.SparseConvTensor, torch.Tensor, torch.Tensor]:
    """spconv's tensor of voxels ``coords`` (M, 4) int ``(b, x, y, z)`` with features ``feats`` (M, C).

    Returns (the SparseConvTensor, the unique coordinates (M', 4) in first-occurrence order, the
    origin (3,) int64): grid index = coordinate - origin, the origin a multiple of ``MAX_STRIDE``
    so that every stride-2 grid down to 16 is MinkowskiEngine's. Duplicates keep their first row."""
    if coords.dim() != 2 or coords.shape[1] != 4 or feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(
            f"expected coordinates (M, 4) and features (M, C), got {tuple(coords.shape)} and {tuple(feats.shape)}"
        )
    if coords.shape[0] == 0:
        raise ValueError("no voxels in the input")
    if coords.device != feats.device:
        coords = coords.to(feats.device)
    c = coords.long()
    if int(c[:, 0].min()) < 0:
        raise ValueError("batch indices must be non-negative")
    origin = torch.div(c[:, 1:].min(0).values, MAX_STRIDE, rounding_mode="floor") * MAX_STRIDE
    rel = c[:, 1:] - origin
    shape = (torch.div(rel.max(0).values, MAX_STRIDE, rounding_mode="floor") + 1) * MAX_STRIDE
    s0, s1, s2 = (int(v) for v in shape)
    key = ((c[:, 0] * s0 + rel[:, 0]) * s1 + rel[:, 1]) * s2 + rel[:, 2]
    uniq, inverse = torch.unique(key, return_inverse=True)
    if uniq.shape[0] < key.shape[0]:
        m = key.shape[0]
        first = torch.full((uniq.shape[0],), m, dtype=torch.long, device=key.device)
        first.scatter_reduce_(0, inverse, torch.arange(m, device=key.device), reduce="amin")
        rows = first.sort().values
        coords, feats, c, rel = coords[rows], feats[rows], c[rows], rel[rows]
    indices = torch.cat([c[:, :1], rel], 1).to(torch.int32).contiguous()
    batch_size = int(c[:, 0].max()) + 1
    return spconv.SparseConvTensor(feats.contiguous(), indices, [s0, s1, s2], batch_size), coords, origin


class Res16UNetBase(nn.Module):
    """Res16UNet on spconv; see :class:`lift3d.nets.res16unet.Res16UNetBase` (same attributes,
    same ``forward(x, return_decoder=False)``, outputs as :class:`Voxels`)."""

    backend = BACKEND
    BLOCK: Type[nn.Module] = BasicBlock
    PLANES: Tuple[int, ...] = (32, 64, 128, 256, 256, 256, 256, 256)
    LAYERS: Tuple[int, ...] = (2, 2, 2, 2, 2, 2, 2, 2)
    DILATIONS: Tuple[int, ...] = (1, 1, 1, 1, 1, 1, 1, 1)
    INIT_DIM = 32

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        D: int = 3,
        conv1_kernel_size: int = 3,
        bn_momentum: float = 0.1,
        normalize_feature: bool = False,
    ):
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if int(D) != 3:
            raise ValueError(f"the spconv backend is 3D only, got D={D}")
        if conv1_kernel_size % 2 != 1:
            raise ValueError(f"conv1_kernel_size must be odd (a submanifold stem), got {conv1_kernel_size}")
        if sp_constants.SAVED_WEIGHT_LAYOUT:
            raise RuntimeError(
                f"SPCONV_SAVED_WEIGHT_LAYOUT={sp_constants.SAVED_WEIGHT_LAYOUT} makes spconv permute weights "
                "when loading; lift3d's checkpoints are in spconv's own (out, K, K, K, in) layout: unset it"
            )
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.feature_dim = int(out_channels)
        self.decoder_dim = int(self.PLANES[7] * self.BLOCK.expansion)
        self.D = 3
        self.normalize_feature = bool(normalize_feature)
        self._bn_momentum = bn_momentum
        P, L, Dl, E = self.PLANES, self.LAYERS, self.DILATIONS, self.BLOCK.expansion

        def down(cin, cout, level):  # stride-2 convolution to ``level`` (tensor stride 2**level)
            return spconv.SparseConv3d(cin, cout, 2, stride=2, bias=False, indice_key=f"down{level}")

        def up(cin, cout, level):  # its inverse, from ``level`` back onto level - 1
            return spconv.SparseInverseConv3d(cin, cout, 2, bias=False, indice_key=f"down{level}")

        def bn(c):
            return SparseBatchNorm(c, momentum=bn_momentum)

        # Registration order is the MinkowskiEngine network's, so state_dict() order matches too.
        self.inplanes = self.INIT_DIM
        self.conv0p1s1 = _subm(in_channels, self.INIT_DIM, conv1_kernel_size, 0)
        self.bn0 = bn(self.INIT_DIM)
        self.conv1p1s2 = down(self.INIT_DIM, self.INIT_DIM, 1)
        self.bn1 = bn(self.INIT_DIM)
        self.block1 = self._make_layer(P[0], L[0], Dl[0], 1)
        self.conv2p2s2 = down(self.inplanes, self.inplanes, 2)
        self.bn2 = bn(self.inplanes)
        self.block2 = self._make_layer(P[1], L[1], Dl[1], 2)
        self.conv3p4s2 = down(self.inplanes, self.inplanes, 3)
        self.bn3 = bn(self.inplanes)
        self.block3 = self._make_layer(P[2], L[2], Dl[2], 3)
        self.conv4p8s2 = down(self.inplanes, self.inplanes, 4)
        self.bn4 = bn(self.inplanes)
        self.block4 = self._make_layer(P[3], L[3], Dl[3], 4)

        self.convtr4p16s2 = up(self.inplanes, P[4], 4)
        self.bntr4 = bn(P[4])
        self.inplanes = P[4] + P[2] * E
        self.block5 = self._make_layer(P[4], L[4], Dl[4], 3)
        self.convtr5p8s2 = up(self.inplanes, P[5], 3)
        self.bntr5 = bn(P[5])
        self.inplanes = P[5] + P[1] * E
        self.block6 = self._make_layer(P[5], L[5], Dl[5], 2)
        self.convtr6p4s2 = up(self.inplanes, P[6], 2)
        self.bntr6 = bn(P[6])
        self.inplanes = P[6] + P[0] * E
        self.block7 = self._make_layer(P[6], L[6], Dl[6], 1)
        self.convtr7p2s2 = up(self.inplanes, P[7], 1)
        self.bntr7 = bn(P[7])
        self.inplanes = P[7] + self.INIT_DIM
        self.block8 = self._make_layer(P[7], L[7], Dl[7], 0)

        self.final = _subm(P[7] * E, out_channels, 1, 0, bias=True)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, dilation: int, level: int) -> nn.Sequential:
        block = self.BLOCK
        downsample = None
        if self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _subm(self.inplanes, planes * block.expansion, 1, level),
                SparseBatchNorm(planes * block.expansion, momentum=self._bn_momentum),
            )
        layers = [block(self.inplanes, planes, level, dilation, downsample, self._bn_momentum)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, level, dilation, None, self._bn_momentum))
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """Kaiming-normal over the fan-out (kernel volume x out channels), as the MinkowskiEngine
        network; batch norm: weight 1, bias 0. Same distributions; not the same draws for a seed."""
        for m in self.modules():
            if isinstance(m, spconv.conv.SparseConvolution):
                kv = 1
                for k in m.kernel_size:
                    kv *= int(k)
                nn.init.normal_(m.weight, 0.0, (2.0 / (kv * m.out_channels)) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, SparseBatchNorm):
                nn.init.ones_(m.bn.weight)
                nn.init.zeros_(m.bn.bias)

    # ------------------------------------------------------------------ forward

    def forward(self, x, return_decoder: bool = False):
        if x.F.dim() != 2 or x.F.shape[1] != self.in_channels:
            raise ValueError(f"the network takes (M, {self.in_channels}) features, got {tuple(x.F.shape)}")
        sp, coords, _ = sparse_conv_tensor(x.C, x.F)
        out_p1 = _relu(self.bn0(self.conv0p1s1(sp)))
        out_b1p2 = self.block1(_relu(self.bn1(self.conv1p1s2(out_p1))))
        out_b2p4 = self.block2(_relu(self.bn2(self.conv2p2s2(out_b1p2))))
        out_b3p8 = self.block3(_relu(self.bn3(self.conv3p4s2(out_b2p4))))
        out = self.block4(_relu(self.bn4(self.conv4p8s2(out_b3p8))))

        out = _relu(self.bntr4(self.convtr4p16s2(out)))
        out = self.block5(_cat(out, out_b3p8))
        out = _relu(self.bntr5(self.convtr5p8s2(out)))
        out = self.block6(_cat(out, out_b2p4))
        out = _relu(self.bntr6(self.convtr6p4s2(out)))
        out = self.block7(_cat(out, out_b1p2))
        out = _relu(self.bntr7(self.convtr7p2s2(out)))
        decoder = self.block8(_cat(out, out_p1))

        feats = self.final(decoder).features
        if self.normalize_feature:
            feats = F.normalize(feats, p=2, dim=1)
        final = Voxels(coords, feats)
        if return_decoder:
            return final, Voxels(coords, decoder.features)
        return final


MODELS: Dict[str, Type[Res16UNetBase]] = make_models(Res16UNetBase, __name__)
Res16UNet14, Res16UNet14A, Res16UNet18, Res16UNet18A, Res16UNet34, Res16UNet34A, Res16UNet34C = MODELS.values()


def build_model(name: str, in_channels: int, out_channels: int, D: int = 3, **kwargs) -> Res16UNetBase:
    """Instantiate a registered network by name (see ``MODELS``)."""
    return build(MODELS, name, in_channels, out_channels, D=D, **kwargs)
