"""The 2D side of 3D-to-2D distillation (Liu, Qi, Fu, CVPR 2021): a PSPNet-style segmentation
network, the simulated-3D branch with the two dimension-normalisation modules, the per-category
discriminators, and the losses.

Network (``Seg2D``)::

    image -> backbone (lift3d.nets.backbones2d, output stride 16) -> pyramid pooling (bins 1, 2, 3, 6)
          -> 3x3 conv = f2D (head_dim channels)
    baseline:   logits = classifier(f2D)
    distilled:  f3D_sim = DN1(f2D)                        (simulated 3D features, C3D channels)
                logits  = classifier([f2D, DN2(f3D_sim)])  (concatenation)

Output stride 16, not 32: PSPNet runs its backbone dilated (output stride 8). The stride-32 map of
a 120x160 frame is 4x5 cells, smaller than the finest pyramid bin (6x6), and a 3D feature map that
coarse cannot follow object boundaries. :func:`dilate_last_stage` removes the last stride-2 of the
backbone and dilates the convolutions after it by 2, so every pretrained weight is kept and the
map is 8x10 (30x40 at 480x640); stride 8 would cost more again, and the
demo runs on two CPU cores.

Dimension normalisation (the paper's two-stage scheme):

- DN1, 2D -> 3D statistics: f3D_sim = (g - mu_B) / sigma_B * (sigma_3D + d_sigma) + (mu_3D + d_mu),
  g = convs(f2D) with C3D channels, mu_B / sigma_B its per-channel batch statistics (running
  averages at inference, as batch normalisation), mu_3D / sigma_3D the pre-computed global
  per-channel statistics of the real 3D features, d_mu / d_sigma learnable offsets (zero at start).
- DN2, back to 2D statistics before the concatenation: h = conv1x1(f3D_sim) with head_dim channels,
  DN2 = (h - mu_B(h)) / sigma_B(h) * (sigma_2D + d_sigma') + (mu_2D + d_mu'), mu_2D / sigma_2D the
  per-channel statistics of f2D in the same batch (detached; running averages at inference).

Losses: L = w_seg CE + w_L2 L_L2 + w_adv L_adv (defaults 1, 0.03, 0.01 as in the paper), with
L_L2 = (1/|P|) sum_{p in P} ||f3D_sim(p) - f3D(p)||^2 over the covered pixels P only (the paper's
distillation loss for paired data), f3D_sim bilinearly sampled at the pixel. Unpaired frames: one small
discriminator D_c per category; semantic-aware adversarial loss
L_D = -sum_c [E log D_c(f3D | c) + E log(1 - D_c(f3D_sim | c))],  L_adv = -sum_c E log D_c(f3D_sim | c),
f3D | c the real 3D features of points labelled c, f3D_sim | c the simulated features at pixels
labelled c; the generator and the discriminators are updated alternately.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.nets.backbones2d import Backbone2D
from lift3d.nets.heads import bilinear_taps

__all__ = [
    "dilate_last_stage",
    "trunk_stages",
    "freeze_early_stages",
    "PyramidPooling",
    "DN1",
    "DN2",
    "Seg2D",
    "Discriminators",
    "sample_pixels",
    "masked_l2",
    "gan_losses",
    "set_requires_grad",
]

BINS = (1, 2, 3, 6)
FIT2D_MODEL_KIND = "lift3d.fit2d"  # the "kind" of a fit2d model.pt: what the fitted teacher loads


# ----------------------------------------------------------------------------- backbone


def dilate_last_stage(trunk: nn.Module) -> nn.Module:
    """Output stride 32 -> 16: the last stride-2 convolution with a kernel > 1 (and any stride-2
    1x1 shortcut after it) gets stride 1; every later convolution with a kernel > 1 gets
    dilation 2 (static padding = dilation * (k - 1) / 2; timm's TF-'SAME' convolutions pad
    themselves from their stride and dilation). In place; returns ``trunk``."""
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    last = max((i for i, m in enumerate(convs) if m.stride == (2, 2) and m.kernel_size[0] > 1), default=None)
    if last is None:
        raise ValueError("dilate_last_stage: the trunk has no stride-2 convolution")
    for i, m in enumerate(convs[last:], start=last):
        if m.stride == (2, 2):
            m.stride = (1, 1)
        if i > last and m.kernel_size[0] > 1:
            m.dilation = (2, 2)
            if type(m) is nn.Conv2d:  # static padding; Conv2dSame pads dynamically
                m.padding = tuple(2 * (k - 1) // 2 for k in m.kernel_size)
    return trunk


def trunk_stages(trunk: nn.Module) -> list[nn.Module]:
    """The trunk's stages in order: its children, with timm EfficientNet's ``blocks`` (a Sequential
    of per-stage Sequentials) expanded; for torchvision's ResNet: conv1, bn1, relu, maxpool, layer1..4."""
    out = []
    for child in trunk.children():
        kids = list(child.children())
        if isinstance(child, nn.Sequential) and kids and all(isinstance(k, nn.Sequential) for k in kids):
            out.extend(kids)
        else:
            out.append(child)
    return out


def freeze_early_stages(trunk: nn.Module, train_stages: int | None) -> None:
    """Only the last ``train_stages`` stages with weights learn (None = all): the frozen early,
    high-resolution stages need no backward pass, which is most of a CPU training step."""
    if train_stages is None:
        return
    stages = [s for s in trunk_stages(trunk) if any(True for _ in s.parameters())]
    for s in stages[: max(0, len(stages) - int(train_stages))]:
        for p in s.parameters():
            p.requires_grad_(False)


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: average-pool to b x b for each bin b, 1x1 conv to C/len(bins)
    channels (+BN, ReLU), bilinear upsampling back, concatenated with the input (2C channels)."""

    def __init__(self, channels: int, bins=BINS):
        super().__init__()
        self.bins = tuple(bins)
        red = max(1, channels // len(self.bins))
        self.stages = nn.ModuleList(_cbr(channels, red, 1) for _ in self.bins)
        self.out_channels = channels + red * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        outs = [x]
        for b, stage in zip(self.bins, self.stages):
            y = stage(F.adaptive_avg_pool2d(x, b))
            outs.append(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(outs, 1)


# ----------------------------------------------------------------------------- dimension normalisation


class _BatchStandardise(nn.Module):
    """(x - mu_B) / sigma_B per channel (batch statistics in training, running averages in eval)."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, momentum=momentum, eps=eps)

    def forward(self, x):
        return self.bn(x)


class DN1(nn.Module):
    """2D features -> simulated 3D features with the global 3D statistics (see the module doc)."""

    def __init__(self, in_channels: int, channels_3d: int, mean_3d, std_3d, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_channels
        self.convs = nn.Sequential(_cbr(in_channels, hidden, 3), nn.Conv2d(hidden, channels_3d, 1))
        self.norm = _BatchStandardise(channels_3d)
        mean_3d = torch.as_tensor(mean_3d, dtype=torch.float32).reshape(-1)
        std_3d = torch.as_tensor(std_3d, dtype=torch.float32).reshape(-1)
        if mean_3d.numel() != channels_3d or std_3d.numel() != channels_3d:
            raise ValueError(
                f"DN1: global 3D mean/std need {channels_3d} channels, got {mean_3d.numel()} / {std_3d.numel()}"
            )
        self.register_buffer("mean_3d", mean_3d)
        self.register_buffer("std_3d", std_3d)
        self.d_mean = nn.Parameter(torch.zeros(channels_3d))
        self.d_std = nn.Parameter(torch.zeros(channels_3d))

    def rescale(self, g: torch.Tensor) -> torch.Tensor:
        z = self.norm(g)
        return z * (self.std_3d + self.d_std)[None, :, None, None] + (self.mean_3d + self.d_mean)[None, :, None, None]

    def forward(self, f2d: torch.Tensor) -> torch.Tensor:
        return self.rescale(self.convs(f2d))


class DN2(nn.Module):
    """Simulated 3D features -> the 2D features' statistics, before the concatenation."""

    def __init__(self, channels_3d: int, channels_2d: int, momentum: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(channels_3d, channels_2d, 1, bias=False)
        self.norm = _BatchStandardise(channels_2d, momentum)
        self.momentum = momentum
        self.register_buffer("mean_2d", torch.zeros(channels_2d))
        self.register_buffer("std_2d", torch.ones(channels_2d))
        self.d_mean = nn.Parameter(torch.zeros(channels_2d))
        self.d_std = nn.Parameter(torch.zeros(channels_2d))

    def forward(self, f3d_sim: torch.Tensor, f2d: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                flat = f2d.detach().transpose(0, 1).reshape(f2d.shape[1], -1)
                mean, std = flat.mean(1), flat.std(1, unbiased=False)
                self.mean_2d.lerp_(mean, self.momentum)
                self.std_2d.lerp_(std, self.momentum)
        else:
            mean, std = self.mean_2d, self.std_2d
        z = self.norm(self.conv(f3d_sim))
        return z * (std + self.d_std)[None, :, None, None] + (mean + self.d_mean)[None, :, None, None]


# ----------------------------------------------------------------------------- the network


class Seg2D(nn.Module):
    """PSPNet-style 2D segmentation; with ``channels_3d`` the simulated-3D branch (distilled)."""

    def __init__(
        self,
        backbone: Backbone2D,
        num_classes: int,
        head_dim: int = 128,
        channels_3d: int | None = None,
        mean_3d=None,
        std_3d=None,
        dropout: float = 0.1,
        train_stages: int | None = None,
    ):
        super().__init__()
        self.backbone_name = backbone.name
        self.trunk = dilate_last_stage(backbone.trunk)
        freeze_early_stages(self.trunk, train_stages)
        self.register_buffer("in_mean", torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("in_std", torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.ppm = PyramidPooling(backbone.channels)
        self.fuse = _cbr(self.ppm.out_channels, head_dim, 3)
        self.num_classes, self.head_dim = int(num_classes), int(head_dim)
        self.distilled = channels_3d is not None
        if self.distilled:
            self.channels_3d = int(channels_3d)
            self.dn1 = DN1(head_dim, self.channels_3d, mean_3d, std_3d)
            self.dn2 = DN2(self.channels_3d, head_dim)
        self.classifier = nn.Sequential(
            nn.Dropout2d(dropout), nn.Conv2d(head_dim * (2 if self.distilled else 1), num_classes, 1)
        )

    def train(self, mode: bool = True):
        """The backbone's BatchNorm keeps its ImageNet statistics (small batches); the rest trains."""
        super().train(mode)
        for m in self.trunk.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, rgb_u8: torch.Tensor) -> dict:
        """``rgb_u8``: (B, 3, H, W) float in 0..255. Returns logits (B, K, h, w) at stride 16 and,
        distilled, f3d_sim (B, C3D, h, w)."""
        x = (rgb_u8 / 255.0 - self.in_mean) / self.in_std
        f2d = self.fuse(self.ppm(self.trunk(x)))
        out = {}
        if self.distilled:
            sim = self.dn1(f2d)
            out["f3d_sim"] = sim
            f2d = torch.cat([f2d, self.dn2(sim, f2d)], 1)
        out["logits"] = self.classifier(f2d)
        return out

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("trunk.")]


class Discriminators(nn.Module):
    """One small discriminator per category: Linear(C3D, hidden) - LeakyReLU(0.2) - Linear(hidden, 1)."""

    def __init__(self, channels_3d: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(channels_3d, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
            for _ in range(num_classes)
        )

    def forward(self, c: int, feats: torch.Tensor) -> torch.Tensor:
        return self.nets[c](feats).squeeze(1)


# ----------------------------------------------------------------------------- losses


def sample_pixels(maps: torch.Tensor, frame_idx: torch.Tensor, pixels_rc: torch.Tensor, image_hw) -> torch.Tensor:
    """(P, C) bilinear samples of ``maps`` (B, C, h, w) at stored pixels (row, col) of an H x W frame
    (align_corners=False: cell (i, j) is centred on pixel ((i + 0.5) H / h - 0.5, ...))."""
    H, W = int(image_hw[0]), int(image_hw[1])
    _, _, h, w = maps.shape
    r0, r1, wr = bilinear_taps(pixels_rc[:, 0], h, H)
    c0, c1, wc = bilinear_taps(pixels_rc[:, 1], w, W)
    wr, wc = wr.to(maps.dtype)[:, None], wc.to(maps.dtype)[:, None]

    def at(r, c):
        return maps[frame_idx, :, r, c]

    top = at(r0, c0) * (1 - wc) + at(r0, c1) * wc
    bottom = at(r1, c0) * (1 - wc) + at(r1, c1) * wc
    return top * (1 - wr) + bottom * wr


def masked_l2(
    f3d_sim: torch.Tensor, frame_idx: torch.Tensor, pixels_rc: torch.Tensor, target: torch.Tensor, image_hw
) -> torch.Tensor:
    """L_L2 = (1/|P|) sum_p ||f3D_sim(p) - f3D(p)||^2 over the covered pixels p only; 0 with none."""
    if len(frame_idx) == 0:
        return f3d_sim.sum() * 0.0
    pred = sample_pixels(f3d_sim, frame_idx, pixels_rc, image_hw)
    return ((pred - target.to(pred.dtype)) ** 2).sum(1).mean()


def gan_losses(
    disc: Discriminators, fake: dict[int, torch.Tensor], real: dict[int, torch.Tensor], for_generator: bool
) -> torch.Tensor:
    """Semantic-aware adversarial losses over the categories c present in both ``fake`` and ``real``
    (feature rows of category c). Generator: mean_c BCE(D_c(fake), 1) (= -E log D_c(f3D_sim|c));
    discriminators: mean_c [BCE(D_c(real), 1) + BCE(D_c(fake), 0)]."""
    cats = sorted(set(fake) & set(real))
    terms = []
    for c in cats:
        lf = disc(c, fake[c])
        if for_generator:
            terms.append(F.binary_cross_entropy_with_logits(lf, torch.ones_like(lf)))
        else:
            lr = disc(c, real[c])
            terms.append(
                F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
                + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
            )
    if not terms:
        return sum(p.sum() for p in disc.parameters()) * 0.0
    return torch.stack(terms).mean()


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)
