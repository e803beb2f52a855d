"""Optimisers and learning-rate schedules shared by the trainers (a config section ``p`` with
``optimizer``, ``lr``, ``momentum``, ``weight_decay``, ``schedule``, ``iterations``)."""

from __future__ import annotations

import math

import torch


def lr_at(p: dict, step: int) -> float:
    """Learning rate of ``step`` (0-based): cosine to 0, poly (power 0.9), constant, or
    exponential (``lr * gamma ** step``, ``gamma`` from the section)."""
    base, total = float(p["lr"]), max(1, int(p["iterations"]))
    t = min(step, total) / total
    sched = p.get("schedule", "cosine")
    if sched == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    if sched == "poly":
        return base * (1.0 - t) ** 0.9
    if sched == "constant":
        return base
    if sched == "exponential":
        gamma = float(p.get("gamma", 1.0))
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"schedule exponential: gamma must be in (0, 1], got {gamma}")
        return base * gamma ** min(step, total)
    raise ValueError(f"schedule must be cosine, poly, constant or exponential, got {sched!r}")


def make_optimizer(p: dict, params) -> torch.optim.Optimizer:
    if p["optimizer"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=float(p["lr"]),
            momentum=float(p.get("momentum", 0.9)),
            weight_decay=float(p.get("weight_decay", 0.0)),
        )
    if p["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=float(p["lr"]), weight_decay=float(p.get("weight_decay", 0.0)))
    raise ValueError(f"pretrain.optimizer must be sgd or adam, got {p['optimizer']!r}")
