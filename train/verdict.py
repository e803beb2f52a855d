"""The verdict: does pretraining beat training from scratch when labels are scarce, and why?

Arms, each an ordinary resumable stage run (an interrupted verdict picks up where it stopped):

- ``scratch``: fine-tuning from a random network;
- one arm per pretraining method (``--methods``; ``ppnce`` and ``soft_ce`` read this
  configuration's teacher, ``ppnce_imagenet`` PPKT on the ImageNet EfficientNet-Lite0 features):
  pretrain once (seed 0), fine-tune per seed;
- the **supervised ceiling**: a network trained from scratch on every label of the fine-tuning
  rooms, then fine-tuned at the same limited annotations with the same protocol; it should end
  near its own all-label score;
- **controls** on the linear probe: PPKT with each point's pixel shuffled within its frame
  (``pretrain.control: shuffled_pairs``) and a randomly initialised network;
- **baselines**: the colour nearest neighbour and the linear probes
  (:mod:`lift3d.train.baselines`), on the supervised vertices of each seed.

Seeds are paired: every arm of a seed shares the seed's limited-annotation file (``la_points``
vertices per training room, drawn with the seed) and its augmentation stream, and
:func:`lift3d.train.stats.paired_difference` gives each method's per-seed difference against
scratch with its 95 % t-interval. Every run of the verdict pins one thread (``--jobs`` runs in
parallel processes; the results do not depend on it). ``<workdir>/verdict.json`` holds every
figure; ``verdict.md`` the readable tables.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from lift3d.core.config import workdir as get_workdir
from lift3d.train import distill2d, finetune, pretrain
from lift3d.train.stats import paired_difference
from lift3d.train.worker import init_worker

log = logging.getLogger("lift3d")

__all__ = ["run_verdict", "format_verdict", "ARMS", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2
# pretraining arms: (method, teacher name override or None, control)
ARMS = {
    "ppnce": ("ppnce", None, None),
    "soft_ce": ("soft_ce", None, None),
    "ppkd": ("ppkd", None, None),
    "ppnce_imagenet": ("ppnce", "efficientnet_lite0", None),
    "shuffled_pairs": ("ppnce", None, "shuffled_pairs"),
}
NAMES = {
    "scratch": "scratch",
    "ppnce": "PPKT (ppnce)",
    "soft_ce": "soft labels (soft_ce)",
    "ppkd": "distillation (ppkd)",
    "ppnce_imagenet": "PPKT, ImageNet teacher",
    "shuffled_pairs": "PPKT, shuffled pairs (control)",
    "ceiling": "supervised ceiling",
    "random": "random network (control)",
}


# ----------------------------------------------------------------------------- configurations


def pretrain_cfg(cfg: dict, arm: str) -> dict:
    method, teacher, control = ARMS[arm]
    c = copy.deepcopy(cfg)
    c["pretrain"]["method"] = method
    c["pretrain"]["control"] = control
    if teacher is not None:
        c["teacher"]["name"], c["teacher"]["weights"], c["teacher"]["class_map"] = teacher, None, None
    return c


def finetune_cfg(cfg: dict, arm: str, seed: int, la_points: int | None, lr_file: str | None, ceiling=None) -> dict:
    """The fine-tuning run of ``arm`` (scratch, a pretraining arm, or ``ceiling``) for ``seed``."""
    c = pretrain_cfg(cfg, arm) if arm in ARMS else copy.deepcopy(cfg)
    f = c["finetune"]
    f["init"] = {"scratch": "scratch", "ceiling": str(ceiling)}.get(arm, "pretrain")
    f["seed"], f["la_file"], f["la_points"], f["lr_file"] = int(seed), None, la_points, lr_file
    return c


def ceiling_cfg(cfg: dict, lr_file: str | None, iterations: int | None) -> dict:
    """The all-label network of the ceiling: scratch, every labelled vertex of the rooms."""
    c = finetune_cfg(cfg, "scratch", 0, None, lr_file)
    if iterations:
        c["finetune"]["iterations"] = int(iterations)
    return c


def rooms_file(cfg: dict, rooms: int | None) -> str | None:
    """An LR file of the first ``rooms`` training rooms (sorted), written once; None = all rooms."""
    if not rooms:
        return None
    from lift3d.train.scenes import LabelledDataset

    entry = finetune.dataset_entry(cfg)
    ds = LabelledDataset(entry, get_workdir(cfg))
    train = sorted(ds.split("train"))
    if rooms > len(train):
        raise ValueError(f"verdict --rooms {rooms}: the dataset has {len(train)} training rooms")
    out = get_workdir(cfg) / "data_efficient" / entry["name"] / f"rooms{rooms}.txt"
    text = "".join(s + "\n" for s in train[:rooms])
    if not out.exists() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    return str(out)


# ----------------------------------------------------------------------------- jobs


def _job(kind: str, cfg: dict, extra: dict | None = None) -> dict:
    """One run of the verdict (in a worker process or in-process)."""
    if kind == "pretrain":
        return pretrain.run(cfg)[0]
    if kind == "finetune":
        finetune.run(cfg)
        return json.loads((finetune.run_dir(cfg) / "run.json").read_text())
    if kind == "probe":
        return _probe(cfg, **(extra or {}))
    if kind == "colour":
        return _colour(cfg)
    distill2d.run(cfg)
    return distill2d.summary(cfg)


def _supervised(cfg: dict):
    from lift3d.train.scenes import LabelledDataset

    ds = LabelledDataset(finetune.dataset_entry(cfg), get_workdir(cfg))
    scenes, sup = finetune.supervision(cfg, ds, ds.split("train"))
    return ds, sup, ds.split("val")


def _colour(cfg: dict) -> dict:
    from lift3d.train.baselines import colour_nn

    ds, sup, val = _supervised(cfg)
    res = colour_nn(ds, sup, val)
    return {k: res[k] for k in ("miou", "macc", "overall_acc", "supervised")}


def _probe(cfg: dict, model: str | None = None) -> dict:
    """Linear probe of the pretrain run's network (``model`` = its model.pt), or of a random one."""
    import torch

    from lift3d.core.checkpoint import read_model_file
    from lift3d.nets.sparse import build_model, checkpoint_backend, weights_for
    from lift3d.train.baselines import linear_probe

    p, f = cfg["pretrain"], cfg["finetune"]
    if model is None:
        torch.manual_seed(int(f["seed"]))
        net = build_model(p["model"], 3, int(p["feature_dim"]), backend=p.get("sparse_backend") or "minkowski")
    else:
        state = read_model_file(model)
        backend = p.get("sparse_backend") or "minkowski"
        net = build_model(
            state["model_name"], int(state.get("in_channels", 3)), int(state["out_channels"]), backend=backend
        )
        net.load_state_dict(weights_for(net, state["model"], checkpoint_backend(state)))
    ds, sup, val = _supervised(cfg)
    voxel = float(f.get("voxel_size") or p["voxel_size"])
    res = linear_probe(net, ds, sup, val, voxel, int(f["seed"]))
    return {k: res[k] for k in ("miou", "macc", "overall_acc", "supervised", "train_loss")}


def _run_graph(todo: list, on_done, jobs: int) -> None:
    """Run the jobs of ``todo`` ((kind, key, cfg, extra)); ``on_done(kind, key, result)`` may
    append more. In ``jobs`` spawned processes of one thread each."""
    # always in worker processes of one thread, even for jobs=1: a result never depends on --jobs
    # or on this process's thread count
    with ProcessPoolExecutor(
        max(1, jobs), mp_context=mp.get_context("spawn"), initializer=init_worker, initargs=(1,)
    ) as pool:
        running = {}
        while todo or running:
            while todo:
                kind, key, c, extra = todo.pop(0)
                log.info("verdict: start %s %s", kind, key)
                running[pool.submit(_job, kind, c, extra)] = (kind, key)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, key = running.pop(fut)
                on_done(kind, key, fut.result())


def _ensure_teachers(cfg: dict, arms: list[str]) -> None:
    """Arms that read another teacher's cache (ppnce_imagenet) get it before anything runs."""
    from lift3d.core.graph import run_stage, stage_status

    for arm in arms:
        c = pretrain_cfg(cfg, arm)
        if c["teacher"]["name"] != cfg["teacher"]["name"] and stage_status(c, "teacher")[0] != "done":
            log.info("verdict: the %s arm reads teacher %s: running the teacher stage", arm, c["teacher"]["name"])
            run_stage(c, "teacher")


# ----------------------------------------------------------------------------- the verdict


def run_verdict(
    cfg: dict,
    seeds: list[int],
    la_points: int | None = 20,
    methods: tuple[str, ...] = ("ppnce", "soft_ce"),
    distill: bool = False,
    jobs: int = 1,
    rooms: int | None = None,
    controls: bool = True,
    ceiling: bool = True,
    ceiling_iterations: int | None = None,
) -> dict:
    """Run every arm (module docstring) and write ``verdict.json`` / ``verdict.md``.

    ``rooms``: fine-tune on the first ``rooms`` training rooms only (an LR file), so pretraining
    reads more rooms than fine-tuning labels. ``distill``: also 3D-to-2D distillation from the
    network fine-tuned from the first method (first seed)."""
    t0 = time.perf_counter()
    bad = [m for m in methods if m not in ARMS or m == "shuffled_pairs"]
    if bad:
        raise ValueError(
            f"verdict: unknown method(s) {bad}; known: {', '.join(a for a in ARMS if a != 'shuffled_pairs')}"
        )
    if not seeds:
        raise ValueError("verdict: no seed")
    lr_file = rooms_file(cfg, rooms)
    pre_arms = list(methods) + (["shuffled_pairs"] if controls else [])
    _ensure_teachers(cfg, pre_arms)
    ft_arms = ["scratch", *methods] + (["ceiling"] if ceiling else [])
    ceil_cfg = ceiling_cfg(cfg, lr_file, ceiling_iterations) if ceiling else None
    ceil_model = str(finetune.run_dir(ceil_cfg) / "model.pt") if ceiling else None
    ft = {(a, s): finetune_cfg(cfg, a, s, la_points, lr_file, ceil_model) for a in ft_arms for s in seeds}
    first = (methods[0] if methods else "scratch", seeds[0])
    res = {"pretrain": {}, "finetune": {}, "probe": {}, "colour": {}, "ceiling_all_labels": None, "distill2d": None}

    def probe_job(arm, seed, model):
        c = finetune_cfg(cfg, "scratch", seed, la_points, lr_file) if arm == "random" else ft_probe_cfg(arm, seed)
        return ("probe", (arm, seed), c, {"model": model})

    def ft_probe_cfg(arm, seed):
        return finetune_cfg(cfg, arm, seed, la_points, lr_file)

    todo = [("pretrain", a, pretrain_cfg(cfg, a), None) for a in pre_arms]
    todo += [("finetune", ("scratch", s), ft[("scratch", s)], None) for s in seeds]
    todo += [("colour", s, ft[("scratch", s)], None) for s in seeds]
    if controls:
        todo += [probe_job("random", s, None) for s in seeds]
    if ceiling:
        todo.append(("finetune", ("ceiling_all", 0), ceil_cfg, None))

    def done(kind, key, result):
        if kind == "pretrain":
            res["pretrain"][key] = result
            log.info(
                "verdict: pretrain %s done (final loss %s, floor %s)",
                key,
                result.get("final_loss"),
                result.get("final_floor"),
            )
            model = str(Path(result["run_dir"]) / "model.pt")
            todo.extend(probe_job(key, s, model) for s in seeds)
            if key in methods:
                todo.extend(("finetune", (key, s), ft[(key, s)], None) for s in seeds)
        elif kind == "finetune" and key[0] == "ceiling_all":
            res["ceiling_all_labels"] = result["eval"]
            todo.extend(("finetune", ("ceiling", s), ft[("ceiling", s)], None) for s in seeds)
        elif kind == "finetune":
            res["finetune"][key] = {
                **result["eval"],
                "seconds": result.get("timing", {}).get("seconds"),
                "run_dir": str(finetune.run_dir(ft[key])),
            }
            log.info("verdict: finetune %s seed %d: val mIoU %.1f", key[0], key[1], 100 * result["eval"]["miou"])
            if distill and key == first:
                todo.append(("distill2d", first, ft[first], None))
        elif kind == "probe":
            res["probe"][key] = result
        elif kind == "colour":
            res["colour"][key] = result
        else:
            res["distill2d"] = {**result, "from": first[0]}

    _run_graph(todo, done, jobs)
    out = summarise(cfg, res, seeds, methods, la_points, rooms, controls, ceiling)
    out.update(
        seconds=round(time.perf_counter() - t0, 1),
        jobs=jobs,
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        threads_per_run=1,
    )
    wd = get_workdir(cfg)
    (wd / "verdict.json").write_text(json.dumps(out, indent=1) + "\n")
    (wd / "verdict.md").write_text(format_verdict(out) + "\n")
    return out


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None], float)
    if not len(v):
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def summarise(cfg, res, seeds, methods, la_points, rooms, controls, ceiling) -> dict:
    """The verdict's JSON: per arm and seed mIoU / mAcc / probe mIoU (in %), means, paired differences."""

    def pct(x):
        return None if x is None else 100.0 * float(x)

    arms = {}
    scratch = {s: pct(res["finetune"][("scratch", s)]["miou"]) for s in seeds}
    random_probe = {s: pct(res["probe"][("random", s)]["miou"]) for s in seeds if ("random", s) in res["probe"]}
    for arm in ["scratch", *methods] + (["ceiling"] if ceiling else []):
        per_seed = {}
        for s in seeds:
            r = res["finetune"][(arm, s)]
            probe = res["probe"].get((arm, s))
            per_seed[str(s)] = {
                "miou": pct(r["miou"]),
                "macc": pct(r["macc"]),
                "probe_miou": pct(probe["miou"]) if probe else None,
                "run_dir": r["run_dir"],
            }
        entry = {"name": NAMES.get(arm, arm), "per_seed": per_seed}
        for key in ("miou", "macc", "probe_miou"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([v[key] for v in per_seed.values()])
        if arm != "scratch":
            entry["paired_diff"] = paired_difference({s: per_seed[str(s)]["miou"] for s in seeds}, scratch)
            if arm in methods and random_probe:
                probes = {s: per_seed[str(s)]["probe_miou"] for s in seeds}
                entry["probe_vs_random"] = paired_difference(probes, random_probe)
        if arm in res["pretrain"]:
            pr = res["pretrain"][arm]
            entry["pretrain"] = {k: pr.get(k) for k in ("final_loss", "final_floor", "steps", "run_dir")}
        arms[arm] = entry
    out = {
        "schema": SCHEMA_VERSION,
        "seeds": list(seeds),
        "la_points": la_points,
        "rooms": rooms,
        "model": cfg["pretrain"]["model"],
        "voxel_size": cfg["finetune"]["voxel_size"] or cfg["pretrain"]["voxel_size"],
        "teacher": cfg["teacher"]["name"],
        "finetune": {
            k: cfg["finetune"][k]
            for k in ("iterations", "batch_size", "lr", "backbone_lr_mult", "probe_steps", "schedule")
        },
        "pretrain_steps": cfg["pretrain"]["iterations"],
        "methods": arms,
        "baselines": {
            "colour_nn": {
                str(s): {k: pct(v) if k != "supervised" else v for k, v in res["colour"][s].items()} for s in seeds
            },
        },
        "controls": {},
    }
    cm, cs = _mean_std([out["baselines"]["colour_nn"][str(s)]["miou"] for s in seeds])
    out["baselines"]["colour_nn_miou_mean"], out["baselines"]["colour_nn_miou_std"] = cm, cs
    if controls:
        for arm in ("shuffled_pairs", "random"):
            per = {str(s): pct(res["probe"][(arm, s)]["miou"]) for s in seeds}
            m, sd = _mean_std(list(per.values()))
            ctrl = {"name": NAMES[arm], "probe_miou": per, "probe_miou_mean": m, "probe_miou_std": sd}
            if arm == "shuffled_pairs":
                pr = res["pretrain"]["shuffled_pairs"]
                ctrl["pretrain"] = {k: pr.get(k) for k in ("final_loss", "final_floor", "steps", "run_dir")}
                if "ppnce" in arms:  # correct pairing must beat it on the probe
                    ctrl["ppnce_minus_control"] = paired_difference(
                        {s: arms["ppnce"]["per_seed"][str(s)]["probe_miou"] for s in seeds},
                        {int(k): v for k, v in per.items()},
                    )
            out["controls"][arm] = ctrl
    if ceiling:
        allm = pct(res["ceiling_all_labels"]["miou"])
        out["ceiling"] = {
            "all_labels_miou": allm,
            "la_miou_mean": arms["ceiling"]["miou_mean"],
            "drop": None if arms["ceiling"]["miou_mean"] is None else allm - arms["ceiling"]["miou_mean"],
        }
    if res.get("distill2d"):
        out["distill2d"] = res["distill2d"]
    out["goal"] = goal_checks(out, methods)
    return out


def goal_checks(out: dict, methods) -> dict:
    """The issue's goals, each true / false / None (not measured)."""
    g = {}
    for m in methods:
        d = out["methods"][m].get("paired_diff") or {}
        low = d.get("ci95_low")
        g[f"{m}_beats_scratch_by_3"] = None if d.get("mean") is None else bool(d["mean"] >= 3.0 and (low or 0) > 0)
        pr = out["methods"][m].get("probe_vs_random") or {}
        g[f"{m}_probe_above_random"] = None if pr.get("mean") is None else bool(pr["mean"] > 0)
    ctrl = out["controls"].get("shuffled_pairs", {}).get("ppnce_minus_control")
    g["ppnce_probe_above_shuffled"] = None if not ctrl else bool(ctrl["mean"] > 0)
    if "ceiling" in out:
        g["ceiling_within_5"] = None if out["ceiling"]["drop"] is None else bool(out["ceiling"]["drop"] <= 5.0)
    return g


def format_verdict(res: dict) -> str:
    """Readable markdown tables of a verdict.json."""

    def cell(mean, std):
        if mean is None:
            return "n/a"
        return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")

    def ci(d):
        if not d or d.get("mean") is None:
            return "n/a"
        if d.get("ci95_low") is None:
            return f"{d['mean']:+.1f}"
        return f"{d['mean']:+.1f} [{d['ci95_low']:+.1f}, {d['ci95_high']:+.1f}]"

    la = f"{res['la_points']} labelled points per room" if res["la_points"] else "all labels"
    rooms = f" of {res['rooms']} rooms" if res.get("rooms") else ""
    f = res["finetune"]
    lines = [
        f"Verdict: {res['model']} at {res['voxel_size']} m, {res['pretrain_steps']} pretraining steps, teacher "
        f"{res['teacher']}; fine-tuning with {la}{rooms}, {f['iterations']} steps of {f['batch_size']} rooms, "
        f"lr {f['lr']} (network x{f['backbone_lr_mult']}, {f['probe_steps']} head-only steps); "
        f"seeds {res['seeds']} (mean ± sample std; difference to scratch: mean [95 % t-interval], paired by seed)",
        "",
        "| method | mIoU (%) | vs scratch | mAcc (%) | linear probe mIoU (%) | pretraining loss / floor |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in res["methods"].items():
        pre = r.get("pretrain") or {}
        loss = "" if not pre else f"{pre['final_loss']} / {pre['final_floor']}"
        diff = ci(r.get("paired_diff")) if arm != "scratch" else ""
        probe = cell(r["probe_miou_mean"], r["probe_miou_std"])
        lines.append(
            f"| {r['name']} | {cell(r['miou_mean'], r['miou_std'])} | {diff}"
            f" | {cell(r['macc_mean'], r['macc_std'])} | {probe} | {loss} |"
        )
    b = res["baselines"]
    lines += [
        "",
        "| baseline / control | mIoU (%) |",
        "|---|---|",
        f"| colour nearest neighbour (same supervised vertices) | "
        f"{cell(b['colour_nn_miou_mean'], b['colour_nn_miou_std'])} |",
    ]
    for c in res.get("controls", {}).values():
        extra = f" (PPKT minus it: {ci(c['ppnce_minus_control'])})" if c.get("ppnce_minus_control") else ""
        lines.append(f"| {c['name']}, linear probe | {cell(c['probe_miou_mean'], c['probe_miou_std'])}{extra} |")
    if "ceiling" in res:
        cl = res["ceiling"]
        lines.append(f"| supervised ceiling, all labels of the rooms | {cell(cl['all_labels_miou'], None)} |")
    d = res.get("distill2d")
    if d:
        lines += [
            "",
            f"3D-to-2D distillation from the network fine-tuned from {d['from']}: 2D mIoU baseline "
            f"{100 * d['2D mIoU baseline']:.1f} %, distilled {100 * d['2D mIoU distilled']:.1f} %",
        ]
    goals = ", ".join(f"{k}: {v}" for k, v in res.get("goal", {}).items())
    lines += ["", f"Goals: {goals}"]
    return "\n".join(lines)
