"""The verdict: does pretraining beat training from scratch when labels are scarce?

For each pretraining method (default PPKT ``ppnce`` and ``soft_ce``) the pretrain stage runs
once (skipped when its run is complete), then fine-tuning runs from scratch and from each
pretrained network with limited annotations (``la_points`` labelled vertices per training
scene, an LA file written in the benchmark's format), once per seed. Every run is an
ordinary, resumable ``finetune`` run folder, so an interrupted verdict picks up where it
stopped. The table (method, mIoU, mAcc; mean and spread over seeds) goes to the terminal,
``<workdir>/verdict.json`` and ``<workdir>/verdict.md``.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing as mp
import platform
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import numpy as np

from lift3d.core.config import workdir as get_workdir
from lift3d.train import distill2d, finetune, pretrain
from lift3d.train.finetune import la_file_for
from lift3d.train.worker import init_worker

log = logging.getLogger("lift3d")

__all__ = ["run_verdict", "format_verdict"]


def _variant(cfg: dict, method: str | None, seed: int, la_points: int | None) -> dict:
    c = copy.deepcopy(cfg)
    if method is not None:
        c["pretrain"]["method"] = method
    c["finetune"]["init"] = "scratch" if method is None else "pretrain"
    c["finetune"]["seed"] = int(seed)
    c["finetune"]["la_file"] = None
    c["finetune"]["la_points"] = la_points
    return c


def _job(kind: str, cfg: dict) -> dict:
    """One stage run of the verdict (in a worker process or in-process)."""
    if kind == "pretrain":
        return pretrain.run(cfg)[0]
    if kind == "finetune":
        finetune.run(cfg)
        return json.loads((finetune.run_dir(cfg) / "run.json").read_text())
    distill2d.run(cfg)
    return distill2d.summary(cfg)


def run_verdict(
    cfg: dict,
    seeds: list[int],
    la_points: int | None = 20,
    methods: tuple[str, ...] = ("ppnce", "soft_ce"),
    distill: bool = False,
    jobs: int = 1,
) -> dict:
    """Pretrain each method, fine-tune from scratch and from each, per seed; return the table.
    ``distill``: also run 3D-to-2D distillation from the network fine-tuned from the first method
    (first seed) and report its 2D mIoU against the same 2D network without the 3D branch.
    ``jobs`` > 1 runs independent stage runs in that many processes of one thread each (on CPU,
    MinkowskiEngine gains little from a second thread, so two runs at once nearly halve the
    time); a fine-tuning run starts once its pretraining run is done. Results do not depend on it."""
    t0 = time.perf_counter()
    la = la_file_for(cfg, la_points) if la_points else None
    pre_cfg = {}
    for m in methods:
        pre_cfg[m] = copy.deepcopy(cfg)
        pre_cfg[m]["pretrain"]["method"] = m
    ft_cfg = {
        (m, seed): _variant(cfg, None if m == "scratch" else m, seed, la_points)
        for seed in seeds
        for m in ("scratch",) + tuple(methods)
    }
    first = (methods[0] if methods else "scratch", seeds[0])
    pre, fin, dist = {}, {}, None
    # the graph: pretrain(m) -> finetune(m, seed); finetune(first) -> distill2d
    todo = [("pretrain", m) for m in methods] + [("finetune", k) for k in ft_cfg if k[0] == "scratch"]

    def cfg_of(kind, key):
        return {"pretrain": lambda: pre_cfg[key], "finetune": lambda: ft_cfg[key], "distill2d": lambda: ft_cfg[first]}[
            kind
        ]()

    def done(kind, key, result):
        nonlocal dist
        if kind == "pretrain":
            pre[key] = result
            log.info("verdict: pretrain %s done (final loss %s)", key, result.get("final_loss"))
            todo.extend(("finetune", k) for k in ft_cfg if k[0] == key)
        elif kind == "finetune":
            fin[key] = result
            log.info("verdict: finetune from %s, seed %d: val mIoU %.1f", key[0], key[1], 100 * result["eval"]["miou"])
            if distill and key == first:
                todo.append(("distill2d", first))
        else:
            dist = result

    if jobs <= 1:
        while todo:
            kind, key = todo.pop(0)
            log.info("verdict: %s %s", kind, key)
            done(kind, key, _job(kind, cfg_of(kind, key)))
    else:
        with ProcessPoolExecutor(
            jobs, mp_context=mp.get_context("spawn"), initializer=init_worker, initargs=(1,)
        ) as pool:
            running = {}
            while todo or running:
                while todo:
                    kind, key = todo.pop(0)
                    log.info("verdict: start %s %s", kind, key)
                    running[pool.submit(_job, kind, cfg_of(kind, key))] = (kind, key)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    kind, key = running.pop(fut)
                    done(kind, key, fut.result())
    runs = []
    for (m, seed), info in sorted(fin.items(), key=lambda kv: (kv[0][1], kv[0][0] != "scratch")):
        runs.append(
            {
                "method": m,
                "seed": seed,
                "miou": info["eval"]["miou"],
                "macc": info["eval"]["macc"],
                "run_dir": str(finetune.run_dir(ft_cfg[(m, seed)])),
                "seconds": info.get("timing", {}).get("seconds"),
            }
        )
    rows = []
    for m in ("scratch",) + tuple(methods):
        mine = [r for r in runs if r["method"] == m]
        mi = np.array([r["miou"] for r in mine], float)
        ma = np.array([r["macc"] for r in mine], float)
        rows.append(
            {
                "method": m,
                "seeds": len(mine),
                "miou_mean": float(mi.mean()),
                "miou_std": float(mi.std(ddof=1)) if len(mi) > 1 else None,
                "macc_mean": float(ma.mean()),
                "macc_std": float(ma.std(ddof=1)) if len(ma) > 1 else None,
            }
        )
    res = {
        "seeds": list(seeds),
        "la_points": la_points,
        "la_file": str(la) if la else None,
        "pretrain": {m: {k: v for k, v in pre[m].items() if k in ("final_loss", "steps", "run_dir")} for m in methods},
        "finetune": {k: cfg["finetune"][k] for k in ("iterations", "batch_size", "lr")},
        "model": cfg["pretrain"]["model"],
        "voxel_size": cfg["finetune"]["voxel_size"] or cfg["pretrain"]["voxel_size"],
        "rows": rows,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    if dist:
        res["distill2d"] = {**dist, "from": first[0]}
    wd = get_workdir(cfg)
    (wd / "verdict.json").write_text(json.dumps(res, indent=1))
    (wd / "verdict.md").write_text(format_verdict(res) + "\n")
    return res


def format_verdict(res: dict) -> str:
    """A markdown table: method, mIoU, mAcc (mean +- sample std over seeds when there are several)."""

    def cell(mean, std):
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")

    la = f"{res['la_points']} labelled points per scene" if res["la_points"] else "all labels"
    lines = [
        f"Verdict: fine-tuning with {la}, {len(res['seeds'])} seed(s) {res['seeds']}, "
        f"{res['model']} at {res['voxel_size']} m, {res['finetune']['iterations']} steps",
        "",
        "| method | mIoU (%) | mAcc (%) |",
        "|---|---|---|",
    ]
    for r in res["rows"]:
        name = {
            "scratch": "scratch",
            "ppnce": "PPKT (ppnce)",
            "soft_ce": "soft labels (soft_ce)",
            "ppkd": "distillation (ppkd)",
        }.get(r["method"], r["method"])
        lines.append(f"| {name} | {cell(r['miou_mean'], r['miou_std'])} | {cell(r['macc_mean'], r['macc_std'])} |")
    d = res.get("distill2d")
    if d:
        lines += [
            "",
            f"2D mIoU (%) on held-out frames, 3D-to-2D distillation from the network fine-tuned from {d['from']}:",
            "",
            "| 2D network | 2D mIoU (%) |",
            "|---|---|",
            f"| baseline (no 3D branch) | {100 * d['2D mIoU baseline']:.1f} |",
            f"| distilled | {100 * d['2D mIoU distilled']:.1f} |",
        ]
    return "\n".join(lines)
