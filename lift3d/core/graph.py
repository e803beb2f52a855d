"""The stage graph: what each stage writes, its identity, and whether it is up to date.

A group's identity is its stage's own config section plus its dataset entry (``config``),
chained with its upstream group's identity (``lineage``). ``status`` compares the stored
attributes with what the current configuration would write, so changing a trainer setting
never makes a preprocessing stage out of date.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lift3d.core.config import defaults, sha256_json, workdir
from lift3d.core.errors import ConfigError
from lift3d.core.registry import STAGES
from lift3d.core.store import group_state, lineage


def stage_graph(cfg: dict | None = None) -> dict[str, list[str]]:
    """stage -> the stages it needs, from stages.yaml's ``graph:`` (the one declaration)."""
    graph = (cfg or defaults())["graph"]
    return {name: list(node.get("needs") or []) for name, node in graph.items()}


def stage_order(cfg: dict | None = None) -> tuple[str, ...]:
    """The stages in an order where every stage comes after what it needs (file order on ties)."""
    needs, done = stage_graph(cfg), []
    while len(done) < len(needs):
        ready = [s for s in needs if s not in done and all(n in done for n in needs[s])]
        if not ready:
            raise ConfigError(f"graph: the stages {sorted(set(needs) - set(done))} need each other (a cycle)")
        done.append(ready[0])
    return tuple(done)


ORDER = stage_order()


@dataclass
class Group:
    stage: str
    store: str  # store name (frames/teacher/points) or run folder under runs/
    path: str  # group path inside the store
    config: dict
    upstream: "Group | None" = None

    @property
    def config_sha256(self) -> str:
        return sha256_json(self.config)

    @property
    def lineage_sha256(self) -> str:
        return lineage(self.config_sha256, self.upstream.lineage_sha256 if self.upstream else None)


def groups(cfg: dict, stage: str) -> list[Group]:
    """The store groups ``stage`` writes under the current configuration (one per dataset)."""
    out = []
    for entry in cfg["datasets"]:
        frames = Group("frames", "frames", entry["name"], {"stage": cfg["frames"], "dataset": entry})
        if stage == "frames":
            out.append(frames)
        elif stage == "teacher":
            out.append(
                Group(
                    "teacher",
                    "teacher",
                    f"{cfg['teacher']['name']}/{entry['name']}",
                    {"stage": cfg["teacher"], "dataset": entry},
                    frames,
                )
            )
        elif stage == "points":
            out.append(Group("points", "points", entry["name"], {"stage": cfg["points"], "dataset": entry}, frames))
    return out


def group_status(wd: Path, g: Group) -> tuple[str, str]:
    """('done' | 'out of date' | 'missing', why) for one group."""
    attrs = group_state(wd, g.store, g.path)
    where = f"{g.store}.zarr/{g.path}"
    if attrs is None:
        return "missing", f"{where} does not exist"
    if not attrs.get("complete"):
        return "out of date", f"{where} is not complete (interrupted run)"
    if attrs.get("config_sha256") != g.config_sha256:
        changed = diff_keys(attrs.get("config", {}), g.config)
        return "out of date", f"{where}: config changed ({', '.join(changed[:6]) or 'hash differs'})"
    if attrs.get("lineage_sha256") != g.lineage_sha256:
        return "out of date", f"{where}: upstream {g.upstream.store}.zarr/{g.upstream.path} changed"
    return "done", f"{where} up to date"


def diff_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (with old -> new)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += diff_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def stage_status(cfg: dict, stage: str) -> tuple[str, list[str]]:
    """Aggregate status of a stage over its groups, with one reason per group."""
    if stage not in ("frames", "teacher", "points"):
        return STAGES.get(stage).status(cfg)
    wd = workdir(cfg)
    results = [group_status(wd, g) for g in groups(cfg, stage)]
    states = {s for s, _ in results}
    agg = "done" if states == {"done"} else ("missing" if states == {"missing"} else "out of date")
    return agg, [why for _, why in results]


def run_stage(cfg: dict, stage: str):
    """Run ``stage``: the ``run(cfg)`` of the module registered for it (pyproject's ``lift3d.stages``)."""
    if stage not in ORDER:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(ORDER)}")
    return STAGES.get(stage).run(cfg)


def upstream_lineages(cfg: dict, stage: str) -> dict:
    """The lineage each store group below ``stage`` must have under the current configuration,
    following the graph's ``needs`` down to the stores (``frames.zarr/<dataset>`` etc.)."""
    needs, seen, todo, out = stage_graph(cfg), set(), list(stage_graph(cfg)[stage]), {}
    while todo:
        s = todo.pop()
        if s in seen:
            continue
        seen.add(s)
        todo += needs[s]
    for s in ORDER:
        if s in seen and s in ("frames", "teacher", "points"):
            for g in groups(cfg, s):
                out[f"{g.store}.zarr/{g.path}"] = g.lineage_sha256
    return out
