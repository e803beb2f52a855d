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
from lift3d.core.device import resolve_device
from lift3d.core.errors import ConfigError
from lift3d.core.registry import STAGES
from lift3d.core.store import diff_keys, failed_scenes, group_state, lineage


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
    failed: tuple = ()  # scenes a committed group was made without (skip_failed_scenes)

    @property
    def config_sha256(self) -> str:
        return sha256_json(self.config)

    @property
    def lineage_sha256(self) -> str:
        return lineage(self.config_sha256, self.upstream.lineage_sha256 if self.upstream else None, self.failed)


# settings that change how fast a stage runs, never what it writes: left out of its identity
THROUGHPUT = {"frames": (), "teacher": ("batch_size", "shard_frames", "device"), "points": ()}


# fit2d settings that change how a run is kept or where it runs, never what it learns
FIT2D_BOOKKEEPING = ("checkpoint_every", "run_name", "device")


def fit2d_identity(cfg: dict) -> dict:
    """What a fit2d run is made from: its settings (bookkeeping left out) and the lineage of each
    of its corpus's frames groups. A fitted teacher's cache carries it in its identity."""
    section = {k: v for k, v in cfg["fit2d"].items() if k not in FIT2D_BOOKKEEPING}
    return {"fit2d": section, "frames": {g.path: g.lineage_sha256 for g in corpus_groups(cfg)}}


def fit2d_run_dir(cfg: dict) -> Path:
    """This configuration's fit2d run folder: ``<workdir>/runs/fit2d/<run_name or backbone-hash>``."""
    f = cfg["fit2d"]
    name = f.get("run_name") or f"{f['backbone']}-{sha256_json(fit2d_identity(cfg))[:10]}"
    return workdir(cfg) / "runs" / "fit2d" / name


def uses_fit2d(cfg: dict) -> bool:
    """The teacher stage reads this configuration's fit2d run (teacher.name: fitted, no weights given)."""
    return cfg["teacher"]["name"] == "fitted" and not cfg["teacher"].get("weights")


def stage_identity(cfg: dict, stage: str) -> dict:
    """The part of a preprocessing stage's section that enters its stores' identity. For the
    teacher, the device enters as what it computes in (float32 on the CPU, bf16 autocast on a GPU),
    resolved here; on a remote cluster, where each worker resolves ``auto`` itself, as written."""
    section = {k: v for k, v in cfg[stage].items() if k not in THROUGHPUT[stage]}
    if stage == "teacher":
        spec = cfg["teacher"].get("device") or "auto"
        remote = bool(cfg["cluster"].get("scheduler") or cfg["cluster"].get("jobqueue"))
        if remote and spec == "auto":
            section["precision"] = "auto (resolved on the workers)"
        else:
            cuda = resolve_device(spec, "teacher.device").type == "cuda"
            section["precision"] = "bf16 autocast" if cuda else "float32"
        if uses_fit2d(cfg):  # a refitted teacher is another teacher: its caches are rebuilt
            section["fit2d_run"] = sha256_json(fit2d_identity(cfg))
    return section


def _frames_group(cfg: dict, entry: dict) -> Group:
    g = Group("frames", "frames", entry["name"], {"stage": stage_identity(cfg, "frames"), "dataset": entry})
    g.failed = tuple(sorted(failed_scenes(workdir(cfg), "frames", g.path, g.config_sha256)))
    return g


def corpus_groups(cfg: dict) -> list[Group]:
    """The frames groups of fit2d's 2D corpus (``fit2d.datasets``): written by the frames stage,
    read by fit2d only (never by teacher, points or the 3D trainers)."""
    return [_frames_group(cfg, entry) for entry in cfg["fit2d"].get("datasets") or []]


def groups(cfg: dict, stage: str) -> list[Group]:
    """The store groups ``stage`` writes under the current configuration (one per entry of
    ``datasets``; the frames stage also writes :func:`corpus_groups`)."""
    out = []
    for entry in cfg["datasets"]:
        frames = _frames_group(cfg, entry)
        if stage == "frames":
            out.append(frames)
        elif stage == "teacher":
            out.append(
                Group(
                    "teacher",
                    "teacher",
                    f"{cfg['teacher']['name']}/{entry['name']}",
                    {"stage": stage_identity(cfg, "teacher"), "dataset": entry},
                    frames,
                )
            )
        elif stage == "points":
            out.append(
                Group(
                    "points",
                    "points",
                    entry["name"],
                    {"stage": stage_identity(cfg, "points"), "dataset": entry},
                    frames,
                )
            )
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
    if attrs.get("failed_scenes"):
        failed = attrs["failed_scenes"]
        return "done", (
            f"{where} up to date without {len(failed)} failed scene(s) (skip_failed_scenes): "
            + "; ".join(f"{s}: {why}" for s, why in sorted(failed.items()))
        )
    return "done", f"{where} up to date"


def stage_status(cfg: dict, stage: str) -> tuple[str, list[str]]:
    """Aggregate status of a stage over its groups, with one reason per group."""
    if stage not in ("frames", "teacher", "points"):
        return STAGES.get(stage).status(cfg)
    wd = workdir(cfg)
    results = [group_status(wd, g) for g in groups(cfg, stage) + (corpus_groups(cfg) if stage == "frames" else [])]
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


def upstream_problems(cfg: dict, lineages: dict) -> list[str]:
    """One reason per store group of ``lineages`` (from :func:`upstream_lineages`) that is missing,
    incomplete or made under another configuration, each naming the stage to run."""
    wd, out = workdir(cfg), []
    for key, lin in lineages.items():
        store, path = key.split(".zarr/", 1)
        attrs = group_state(wd, store, path)
        if attrs is None or not attrs.get("complete"):
            out.append(f"{key} is missing or incomplete: run 'lift3d run {store}'")
        elif attrs.get("lineage_sha256") != lin:
            out.append(f"{key} is out of date: run 'lift3d run {store}'")
    return out
