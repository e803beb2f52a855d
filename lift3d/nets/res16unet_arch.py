"""The Res16UNet family as data, shared by both sparse backends (:mod:`lift3d.nets.res16unet` on
MinkowskiEngine, :mod:`lift3d.nets.res16unet_spconv` on spconv): per network its blocks per stage
(``LAYERS``) and channels per stage (``PLANES``); everything else comes from the backend's base class.
This module imports neither library."""

from __future__ import annotations

from typing import Dict, Tuple, Type

_WIDE = (32, 64, 128, 256, 256, 256, 256, 256)  # the base class's planes
_A = (32, 64, 128, 256, 128, 128, 96, 96)

ARCHITECTURES: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "Res16UNet14": {"LAYERS": (1, 1, 1, 1, 1, 1, 1, 1), "PLANES": _WIDE},
    "Res16UNet14A": {"LAYERS": (1, 1, 1, 1, 1, 1, 1, 1), "PLANES": _A},
    "Res16UNet18": {"LAYERS": (2, 2, 2, 2, 2, 2, 2, 2), "PLANES": _WIDE},
    "Res16UNet18A": {"LAYERS": (2, 2, 2, 2, 2, 2, 2, 2), "PLANES": _A},
    "Res16UNet34": {"LAYERS": (2, 3, 4, 6, 2, 2, 2, 2), "PLANES": _WIDE},
    "Res16UNet34A": {"LAYERS": (2, 3, 4, 6, 2, 2, 2, 2), "PLANES": (32, 64, 128, 256, 256, 128, 64, 64)},
    "Res16UNet34C": {"LAYERS": (2, 3, 4, 6, 2, 2, 2, 2), "PLANES": (32, 64, 128, 256, 256, 128, 96, 96)},
}


def make_models(base: type, module: str) -> Dict[str, Type]:
    """One subclass of ``base`` per architecture, named as the architecture."""
    return {name: type(name, (base,), {**spec, "__module__": module}) for name, spec in ARCHITECTURES.items()}


def build(models: Dict[str, Type], name: str, in_channels: int, out_channels: int, D: int = 3, **kwargs):
    """Instantiate the network ``name`` of ``models``."""
    try:
        cls = models[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(models)}") from None
    return cls(in_channels, out_channels, D=D, **kwargs)
