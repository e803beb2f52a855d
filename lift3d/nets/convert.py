"""State dicts between the two sparse backends: MinkowskiEngine <-> spconv, exact (pure moves of
numbers, no arithmetic), for the Res16UNet family and anything around it (heads, wrapper prefixes).

The module names are the same in both networks; what differs:

| what | MinkowskiEngine | spconv |
|---|---|---|
| convolution parameter | ``<m>.kernel`` | ``<m>.weight`` |
| kernel K > 1 | ``(K**3, in, out)``, index ``k = a + K b + K**2 c`` | ``(out, K, K, K, in)``, ``[o, a, b, c, i]`` |
| 1x1 kernel | ``(in, out)`` | ``(out, 1, 1, 1, in)`` holding the (in, out) matrix's memory |
| convolution bias | ``(1, out)`` | ``(out,)`` |
| batch norm | ``<m>.bn.*`` | ``<m>.bn.*`` (the same) |

Here ``(a, b, c)`` is the kernel offset along the coordinate columns (x, y, z). For odd K both
libraries cross-correlate over offsets ``(a, b, c) - (K - 1) / 2``; for the kernel-2 stride-2
convolution and its transpose the offsets are ``(a, b, c)`` in units of the finer grid. So the
offset order differs (MinkowskiEngine enumerates x fastest, spconv lays z fastest) but each offset
keeps its matrix. spconv computes a 1x1 convolution as ``features @ weight.view(in, out)``: its
``(out, 1, 1, 1, in)`` weight is the (in, out) matrix's memory, not its transpose.

Which keys are convolutions: MinkowskiEngine's are the ``*.kernel`` keys; spconv's the 5-D
``*.weight`` keys (batch norm and linear weights are 1-D / 2-D, 2D convolutions 4-D). A ``*.bias``
belongs to a convolution when its module has such a kernel / weight.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

__all__ = ["BACKENDS", "minkowski_to_spconv", "spconv_to_minkowski", "convert_state_dict"]

BACKENDS = ("minkowski", "spconv")


def _cube_side(kv: int, key: str) -> int:
    k = round(kv ** (1.0 / 3.0))
    for side in (k - 1, k, k + 1):
        if side > 0 and side**3 == kv:
            return side
    raise ValueError(f"{key}: kernel volume {kv} is not a cube (only K x K x K kernels convert)")


def _me_kernel_to_spconv(kernel: torch.Tensor, key: str) -> torch.Tensor:
    if kernel.dim() == 2:  # 1x1: (in, out) -> the same memory as (out, 1, 1, 1, in)
        cin, cout = kernel.shape
        return kernel.contiguous().reshape(cout, 1, 1, 1, cin).clone()
    if kernel.dim() != 3:
        raise ValueError(f"{key}: a MinkowskiEngine kernel is (K**3, in, out) or (in, out), got {tuple(kernel.shape)}")
    kv, cin, cout = kernel.shape
    K = _cube_side(kv, key)
    # k = a + K b + K^2 c: as (K, K, K) the axes are (c, b, a)
    return kernel.reshape(K, K, K, cin, cout).permute(4, 2, 1, 0, 3).contiguous()


def _spconv_weight_to_me(weight: torch.Tensor, key: str) -> torch.Tensor:
    cout, k0, k1, k2, cin = weight.shape
    if not (k0 == k1 == k2):
        raise ValueError(f"{key}: only K x K x K kernels convert, got {tuple(weight.shape)}")
    if k0 == 1:
        return weight.contiguous().reshape(cin, cout).clone()
    return weight.permute(3, 2, 1, 4, 0).reshape(k0**3, cin, cout).contiguous()


def _split(key: str) -> tuple[str, str]:
    """(module, leaf) of a state-dict key; a bare ``kernel`` / ``weight`` is module ``""``."""
    mod, _, leaf = key.rpartition(".")
    return mod, leaf


def _join(mod: str, leaf: str) -> str:
    return f"{mod}.{leaf}" if mod else leaf


def minkowski_to_spconv(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """A MinkowskiEngine state dict as the spconv network's (key order kept)."""
    convs = {_split(k)[0] for k in state_dict if _split(k)[1] == "kernel"}
    out = OrderedDict()
    for k, v in state_dict.items():
        mod, leaf = _split(k)
        if mod in convs and leaf == "kernel":
            out[_join(mod, "weight")] = _me_kernel_to_spconv(v, k)
        elif mod in convs and leaf == "bias":
            out[k] = v.reshape(-1).clone()
        else:
            out[k] = v
    return out


def spconv_to_minkowski(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """A spconv state dict as the MinkowskiEngine network's (key order kept)."""
    convs = {_split(k)[0] for k, v in state_dict.items() if _split(k)[1] == "weight" and v.dim() == 5}
    out = OrderedDict()
    for k, v in state_dict.items():
        mod, leaf = _split(k)
        if mod in convs and leaf == "weight":
            out[_join(mod, "kernel")] = _spconv_weight_to_me(v, k)
        elif mod in convs and leaf == "bias":
            out[k] = v.reshape(1, -1).clone()
        else:
            out[k] = v
    return out


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], src: str, dst: str) -> "OrderedDict[str, torch.Tensor]":
    """``state_dict`` written by backend ``src`` for backend ``dst`` (a copy when they agree)."""
    for name, value in (("src", src), ("dst", dst)):
        if value not in BACKENDS:
            raise ValueError(f"{name}: unknown sparse backend {value!r}; known: {', '.join(BACKENDS)}")
    if src == dst:
        return OrderedDict(state_dict.items())
    return minkowski_to_spconv(state_dict) if dst == "spconv" else spconv_to_minkowski(state_dict)
