"""One device resolver for every stage: ``auto`` (or null) is CUDA when torch sees a GPU, else
the CPU; an explicit CUDA device on a machine without one is an error naming the setting."""

from __future__ import annotations

import torch

from lift3d.core.errors import Lift3dError


class DeviceError(Lift3dError, RuntimeError):
    """A device setting asks for hardware this machine does not have."""


def resolve_device(spec: str | torch.device | None, key: str = "device") -> torch.device:
    """``spec`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, from the setting ``key``) as a torch device."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{key}: {spec!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"{key} is {str(spec)!r} but torch sees no CUDA device (torch {torch.__version__}); use {key}=auto or cpu"
        )
    return dev
