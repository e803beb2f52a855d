"""Sparse residual U-Nets (SR-UNet / Res16UNet family) on MinkowskiEngine 0.5.

The family is the one used by PointContrast, Contrastive Scene Contexts (CSC) and PPKT as the 3D
backbone: a stem convolution at stride 1, four stride-2 encoder stages of residual basic blocks
(tensor strides 2, 4, 8, 16), four decoder stages that upsample with a stride-2 transposed
convolution, concatenate the encoder skip of the same stride and apply residual blocks, and a
final 1x1 convolution (with bias) to ``out_channels``.

Module names follow the upstream definition (``conv0p1s1``, ``bn0``, ..., ``block8``, ``final``),
so a state dict of ``Res16UNet34C(3, 32)`` has exactly PointContrast's key names and shapes
(``tests/fixtures/pointcontrast_manifest.json`` lists them; ``export_pointcontrast`` checks and orders).

Kernel layout (MinkowskiEngine): a convolution's ``kernel`` is ``(kernel_volume, in, out)``; a 1x1
stride-1 convolution stores ``(in, out)``. The offset of kernel index k for a 3-cube of size K
(odd K) is ``(k % K, (k // K) % K, k // K**2) - (K - 1) / 2`` on the (x, y, z) axes, x fastest;
for even K the offsets are ``0 .. K-1`` times the tensor stride. The output is the
cross-correlation ``out[u] = sum_k x[u + off_k] @ W_k`` (tests/unit/test_models.py checks this
against ``torch.nn.functional.conv3d``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, Sequence, Tuple, Type

import MinkowskiEngine as ME
import torch
import torch.nn as nn

from lift3d.nets.res16unet_arch import build, make_models

__all__ = [
    "BasicBlock",
    "Res16UNetBase",
    "MODELS",
    "build_model",
    "export_pointcontrast",
    "load_pointcontrast",
]


class BasicBlock(nn.Module):
    """Residual basic block: conv3-BN-ReLU-conv3-BN, plus (projected) identity, then ReLU."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        bn_momentum: float = 0.1,
        D: int = 3,
    ):
        super().__init__()
        self.conv1 = ME.MinkowskiConvolution(
            inplanes, planes, kernel_size=3, stride=stride, dilation=dilation, bias=False, dimension=D
        )
        self.norm1 = ME.MinkowskiBatchNorm(planes, momentum=bn_momentum)
        self.conv2 = ME.MinkowskiConvolution(
            planes, planes, kernel_size=3, stride=1, dilation=dilation, bias=False, dimension=D
        )
        self.norm2 = ME.MinkowskiBatchNorm(planes, momentum=bn_momentum)
        self.relu = ME.MinkowskiReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        out = out + residual
        return self.relu(out)


class Res16UNetBase(nn.Module):
    """Res16UNet: residual sparse U-Net with encoder strides 2..16 and a symmetric decoder.

    ``forward(x)`` returns the final per-voxel features (a SparseTensor with ``out_channels``
    features on the input coordinates); ``forward(x, return_decoder=True)`` returns
    ``(final, decoder)`` where ``decoder`` is the penultimate (block8) SparseTensor with
    ``decoder_dim`` features, which 3D-to-2D distillation uses.

    Attributes: ``feature_dim`` (= out_channels, the width of the final features),
    ``decoder_dim`` (= PLANES[7]), ``in_channels``, ``out_channels``, ``D``.
    """

    backend = "minkowski"  # lift3d.nets.sparse; the spconv twin: lift3d.nets.res16unet_spconv
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
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.feature_dim = int(out_channels)
        self.decoder_dim = int(self.PLANES[7] * self.BLOCK.expansion)
        self.D = int(D)
        self.normalize_feature = bool(normalize_feature)
        self._bn_momentum = bn_momentum
        P, L, Dl, E = self.PLANES, self.LAYERS, self.DILATIONS, self.BLOCK.expansion

        def conv(cin, cout, k, s=1, bias=False):
            return ME.MinkowskiConvolution(cin, cout, kernel_size=k, stride=s, bias=bias, dimension=D)

        def up(cin, cout):
            return ME.MinkowskiConvolutionTranspose(cin, cout, kernel_size=2, stride=2, bias=False, dimension=D)

        def bn(c):
            return ME.MinkowskiBatchNorm(c, momentum=bn_momentum)

        # Registration order mirrors the upstream definition, so state_dict() order matches too.
        self.inplanes = self.INIT_DIM
        self.conv0p1s1 = conv(in_channels, self.INIT_DIM, conv1_kernel_size)
        self.bn0 = bn(self.INIT_DIM)
        self.conv1p1s2 = conv(self.INIT_DIM, self.INIT_DIM, 2, 2)
        self.bn1 = bn(self.INIT_DIM)
        self.block1 = self._make_layer(P[0], L[0], Dl[0])
        self.conv2p2s2 = conv(self.inplanes, self.inplanes, 2, 2)
        self.bn2 = bn(self.inplanes)
        self.block2 = self._make_layer(P[1], L[1], Dl[1])
        self.conv3p4s2 = conv(self.inplanes, self.inplanes, 2, 2)
        self.bn3 = bn(self.inplanes)
        self.block3 = self._make_layer(P[2], L[2], Dl[2])
        self.conv4p8s2 = conv(self.inplanes, self.inplanes, 2, 2)
        self.bn4 = bn(self.inplanes)
        self.block4 = self._make_layer(P[3], L[3], Dl[3])

        self.convtr4p16s2 = up(self.inplanes, P[4])
        self.bntr4 = bn(P[4])
        self.inplanes = P[4] + P[2] * E
        self.block5 = self._make_layer(P[4], L[4], Dl[4])
        self.convtr5p8s2 = up(self.inplanes, P[5])
        self.bntr5 = bn(P[5])
        self.inplanes = P[5] + P[1] * E
        self.block6 = self._make_layer(P[5], L[5], Dl[5])
        self.convtr6p4s2 = up(self.inplanes, P[6])
        self.bntr6 = bn(P[6])
        self.inplanes = P[6] + P[0] * E
        self.block7 = self._make_layer(P[6], L[6], Dl[6])
        self.convtr7p2s2 = up(self.inplanes, P[7])
        self.bntr7 = bn(P[7])
        self.inplanes = P[7] + self.INIT_DIM
        self.block8 = self._make_layer(P[7], L[7], Dl[7])

        self.final = conv(P[7] * E, out_channels, 1, 1, bias=True)
        self.relu = ME.MinkowskiReLU(inplace=True)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, dilation: int) -> nn.Sequential:
        block = self.BLOCK
        downsample = None
        if self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                ME.MinkowskiConvolution(
                    self.inplanes, planes * block.expansion, kernel_size=1, stride=1, bias=False, dimension=self.D
                ),
                ME.MinkowskiBatchNorm(planes * block.expansion, momentum=self._bn_momentum),
            )
        layers = [
            block(
                self.inplanes,
                planes,
                stride=1,
                dilation=dilation,
                downsample=downsample,
                bn_momentum=self._bn_momentum,
                D=self.D,
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, stride=1, dilation=dilation, bn_momentum=self._bn_momentum, D=self.D)
            )
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (ME.MinkowskiConvolution, ME.MinkowskiConvolutionTranspose)):
                # Kaiming-normal over the fan-out of the (kernel_volume, in, out) kernel.
                kv = m.kernel.shape[0] if m.kernel.dim() == 3 else 1
                std = (2.0 / (kv * m.out_channels)) ** 0.5
                nn.init.normal_(m.kernel, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, ME.MinkowskiBatchNorm):
                nn.init.ones_(m.bn.weight)
                nn.init.zeros_(m.bn.bias)

    def forward(self, x: ME.SparseTensor, return_decoder: bool = False):
        out_p1 = self.relu(self.bn0(self.conv0p1s1(x)))
        out_b1p2 = self.block1(self.relu(self.bn1(self.conv1p1s2(out_p1))))
        out_b2p4 = self.block2(self.relu(self.bn2(self.conv2p2s2(out_b1p2))))
        out_b3p8 = self.block3(self.relu(self.bn3(self.conv3p4s2(out_b2p4))))
        out = self.block4(self.relu(self.bn4(self.conv4p8s2(out_b3p8))))

        out = self.relu(self.bntr4(self.convtr4p16s2(out)))
        out = self.block5(ME.cat(out, out_b3p8))
        out = self.relu(self.bntr5(self.convtr5p8s2(out)))
        out = self.block6(ME.cat(out, out_b2p4))
        out = self.relu(self.bntr6(self.convtr6p4s2(out)))
        out = self.block7(ME.cat(out, out_b1p2))
        out = self.relu(self.bntr7(self.convtr7p2s2(out)))
        decoder = self.block8(ME.cat(out, out_p1))

        final = self.final(decoder)
        if self.normalize_feature:
            feats = torch.nn.functional.normalize(final.F, p=2, dim=1)
            final = ME.SparseTensor(
                feats, coordinate_map_key=final.coordinate_map_key, coordinate_manager=final.coordinate_manager
            )
        if return_decoder:
            return final, decoder
        return final


MODELS: Dict[str, Type[Res16UNetBase]] = make_models(Res16UNetBase, __name__)
Res16UNet14, Res16UNet14A, Res16UNet18, Res16UNet18A, Res16UNet34, Res16UNet34A, Res16UNet34C = MODELS.values()


def build_model(name: str, in_channels: int, out_channels: int, D: int = 3, **kwargs) -> Res16UNetBase:
    """Instantiate a registered network by name (see ``MODELS``)."""
    return build(MODELS, name, in_channels, out_channels, D=D, **kwargs)


# --- PointContrast / CSC checkpoint interchange ---------------------------------------------


def _network_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The Res16UNet part of a state dict, with whatever prefix leads its keys removed
    (``module.`` from DDP, ``backbone.`` / ``net.`` from a trainer that also holds heads).
    The prefix is the one in front of ``conv0p1s1.kernel``; it must be unique."""
    anchor = "conv0p1s1.kernel"
    prefixes = {
        k[: -len(anchor)] for k in state_dict if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")
    }
    if not prefixes:
        return {}
    if len(prefixes) > 1:
        raise ValueError(f"several Res16UNet backbones in one state dict: {sorted(prefixes)}")
    (prefix,) = prefixes
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


_TOP_ORDER = (
    "conv0p1s1",
    "bn0",
    "conv1p1s2",
    "bn1",
    "block1",
    "conv2p2s2",
    "bn2",
    "block2",
    "conv3p4s2",
    "bn3",
    "block3",
    "conv4p8s2",
    "bn4",
    "block4",
    "convtr4p16s2",
    "bntr4",
    "block5",
    "convtr5p8s2",
    "bntr5",
    "block6",
    "convtr6p4s2",
    "bntr6",
    "block7",
    "convtr7p2s2",
    "bntr7",
    "block8",
    "final",
)


def export_pointcontrast(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Return the backbone part of ``state_dict`` as PointContrast/CSC's Res16UNet keys.

    Our module names are the upstream ones, so this strips wrapper prefixes, drops keys that are
    not part of the network (heads, optimiser state), moves tensors to the CPU and orders the keys
    as upstream registers them. Load the result with ``Res16UNet34C(3, out).load_state_dict`` in
    PointContrast's or CSC's code base.
    """
    sd = _network_keys(state_dict)
    rank = {name: i for i, name in enumerate(_TOP_ORDER)}
    kept = [k for k in sd if k.split(".", 1)[0] in rank]
    if not kept:
        raise ValueError("state dict holds no Res16UNet keys (conv0p1s1, block1, ..., final)")
    # Stable sort on the top-level module keeps the (registration) order inside each module.
    kept.sort(key=lambda k: rank[k.split(".", 1)[0]])
    return OrderedDict((k, sd[k].detach().cpu().contiguous()) for k in kept)


def load_pointcontrast(
    model: Res16UNetBase, state_dict: Mapping[str, torch.Tensor], skip_mismatched_final: bool = True
) -> Sequence[str]:
    """Load a PointContrast/CSC (or our exported) Res16UNet state dict into ``model``.

    ``final.*`` is skipped when its shape differs (a different ``out_channels``); every other key
    must match in name and shape. Returns the list of skipped keys.
    """
    sd = export_pointcontrast(state_dict)
    own = model.state_dict()
    skipped = []
    for k, v in list(sd.items()):
        if k not in own:
            raise KeyError(f"unexpected key {k!r} for {type(model).__name__}")
        if tuple(own[k].shape) != tuple(v.shape):
            if skip_mismatched_final and k.startswith("final."):
                skipped.append(k)
                del sd[k]
                continue
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    missing = [k for k in own if k not in sd and k not in skipped]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} keys, e.g. {missing[:3]}")
    model.load_state_dict(sd, strict=False)
    return skipped
