"""Hyper-parameter sweeps over a training stage, against the same caches.

``lift3d sweep pretrain -o pretrain.temperature=0.04,0.07 -o pretrain.lr=0.1,0.5`` runs every
combination (a grid), each in its own run folder under ``<workdir>/runs/pretrain/``, and prints a
table at the end. A value with top-level commas is a list of values to sweep; a value written as
a YAML list or mapping (``[64, 96]``) is one value. A named grid can also live in the config:
``sweeps: {temps: {pretrain.temperature: [0.04, 0.07]}}`` then ``lift3d sweep pretrain --name temps``.
A sweep never runs an upstream stage: it refuses to start unless they are all done.
"""

from __future__ import annotations

import copy
import itertools
import json

from lift3d.core import config as C
from lift3d.core import graph as S
from lift3d.core.errors import SweepError

SWEEPABLE = ("pretrain",)


def split_values(raw: str) -> list[str]:
    """'0.1,0.5' -> ['0.1', '0.5']; '[64, 96]' stays one value."""
    raw = raw.strip()
    if raw.startswith(("[", "{", "'", '"')):
        return [raw]
    return [v.strip() for v in raw.split(",") if v.strip()]


def grid(sweep_overrides: list[str], named: dict | None = None) -> list[list[str]]:
    """Every combination, as lists of ``key=value`` overrides."""
    axes: list[tuple[str, list[str]]] = []
    for key, values in (named or {}).items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"sweeps entry {key!r}: expected a non-empty list of values, got {values!r}")
        axes.append((key, [json.dumps(v) for v in values]))  # JSON is YAML: parsed back exactly
    for item in sweep_overrides:
        if "=" not in item:
            raise SweepError(f"sweep override {item!r} must look like key.path=v1,v2")
        key, raw = item.split("=", 1)
        axes.append((key.strip(), split_values(raw)))
    if not axes:
        raise SweepError("nothing to sweep: give -o key=v1,v2 or --name with a sweeps: entry")
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a key is swept twice: {keys}")
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(vs for _, vs in axes))]


def run_sweep(stage: str, config_path, overrides: list[str], name: str | None = None) -> list[dict]:
    if stage not in SWEEPABLE:
        raise SweepError(f"stage {stage!r} cannot be swept; sweepable: {', '.join(SWEEPABLE)}")
    base = C.load(config_path, [])
    named = None
    if name is not None:
        if name not in base.get("sweeps", {}):
            raise SweepError(
                f"no sweep named {name!r} in sweeps: (have: {', '.join(base.get('sweeps', {})) or 'none'})"
            )
        named = base["sweeps"][name]
    combos = grid(list(overrides), named)
    cfgs = []
    for combo in combos:
        cfg = C.load(config_path, combo)  # each combination validated like a normal run
        if cfg["pretrain"].get("run_name"):
            cfg["pretrain"]["run_name"] = f"{cfg['pretrain']['run_name']}-{len(cfgs):03d}"
        cfgs.append((combo, cfg))
    for up in cfgs[0][1]["graph"][stage]["needs"] + ["frames"]:
        state, why = S.stage_status(cfgs[0][1], up)
        if state != "done":
            raise SweepError(
                f"upstream stage {up!r} is {state} ({'; '.join(why)}); a sweep never runs it: "
                f"run 'lift3d run all' (or 'lift3d run {up}') first"
            )
    rows = []
    for i, (combo, cfg) in enumerate(cfgs):
        out = S.run_stage(copy.deepcopy(cfg), stage)
        for row in out if isinstance(out, list) else [out]:
            rows.append({"run": i, **{c.split("=", 1)[0]: c.split("=", 1)[1] for c in combo}, **row})
    return rows
