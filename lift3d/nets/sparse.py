"""One entry for the 3D networks of both sparse backends (docs/backends.md).

- ``minkowski`` (the default): :mod:`lift3d.nets.res16unet`, MinkowskiEngine 0.5.4;
- ``spconv``: :mod:`lift3d.nets.res16unet_spconv`, spconv 2.x (imported on first use).

Both networks take the trainer's batches, batch-first int coordinates (M, 4) and features (M, C)
(:func:`sparse_input`), and return per-voxel features as ``.F`` (with their coordinates as ``.C``),
rows in the order of the input's unique coordinates. A checkpoint names its backend
(:func:`checkpoint_backend`; files without one are MinkowskiEngine's); :func:`weights_for` converts
its state dict when the network it is loaded into is of the other backend.
"""

from __future__ import annotations

from typing import Mapping

import MinkowskiEngine as ME
import torch

from lift3d.nets import res16unet
from lift3d.nets.convert import BACKENDS, convert_state_dict

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "MODELS",
    "check_backend",
    "build_model",
    "backend_of",
    "sparse_input",
    "checkpoint_backend",
    "weights_for",
]

DEFAULT_BACKEND = "minkowski"
MODELS = tuple(res16unet.MODELS)  # the same names in both backends


def check_backend(value, where: str = "sparse_backend") -> str:
    """``value`` if it names a backend (None: the default); otherwise a ValueError naming ``where``."""
    if value is None:
        return DEFAULT_BACKEND
    if value not in BACKENDS:
        raise ValueError(f"{where}: unknown sparse backend {value!r}; choose one of {', '.join(BACKENDS)}")
    return value


def _module(backend: str):
    if check_backend(backend) == "spconv":
        from lift3d.nets import res16unet_spconv  # optional backend: loaded only when asked for

        return res16unet_spconv
    return res16unet


def build_model(
    name: str, in_channels: int, out_channels: int, backend: str = DEFAULT_BACKEND, D: int = 3, **kwargs
) -> torch.nn.Module:
    """A registered Res16UNet (``MODELS``) of ``backend``."""
    return _module(backend).build_model(name, in_channels, out_channels, D=D, **kwargs)


def backend_of(net: torch.nn.Module) -> str:
    """The backend of a network built here (through DistributedDataParallel's ``.module`` too)."""
    net = getattr(net, "module", net)
    return getattr(net, "backend", DEFAULT_BACKEND)


def sparse_input(feats: torch.Tensor, coords: torch.Tensor, backend: str = DEFAULT_BACKEND):
    """The network input of ``backend`` for features (M, C) and coordinates (M, 4) int, batch first."""
    if check_backend(backend) == "spconv":
        return _module("spconv").Voxels(coords, feats)
    return ME.SparseTensor(feats, coordinates=coords)


def checkpoint_backend(obj: Mapping) -> str:
    """The backend a lift3d model file / checkpoint was written with (MinkowskiEngine when unnamed)."""
    return check_backend(obj.get("backend"), "the checkpoint's 'backend'")


def weights_for(net: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], src: str) -> dict:
    """``state_dict``, written by backend ``src``, in the layout of ``net``'s backend."""
    return convert_state_dict(state_dict, check_backend(src), backend_of(net))
