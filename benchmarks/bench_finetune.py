"""Fine-tuning cost per scene: wall time of one training step (augment, voxelise, forward,
backward, SGD) and of evaluating one scene, and the process's peak memory.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_finetune.py [--scenes 2 --voxel 0.05
        --model Res16UNet14A --steps 4 --threads 1]

Generates synthetic rooms (the demo's generator and mesh spacing) in a temporary folder and
reads them with the real labelled-scene reader, then times ``lift3d.train.finetune.step_loss`` with
one scene per step (the demo's batch) and ``lift3d.train.finetune.evaluate`` per scene. The first step
is a warm-up and is not counted. Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lift3d.core import config as C
from lift3d.train import finetune as FT
from lift3d.train.scenes import IGNORE_INDEX, LabelledDataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--voxel", type=float, default=0.05)
    ap.add_argument("--model", default="Res16UNet14A")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    wd = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    try:
        cfg = C.defaults()
        cfg["workdir"] = str(wd)
        cfg["datasets"][0].update({"scenes": max(2, a.scenes), "split": "all"})
        cfg["finetune"].update({"init": "scratch", "model": a.model, "voxel_size": a.voxel, "device": "cpu"})
        f = dict(cfg["finetune"])
        t = time.perf_counter()
        ds = LabelledDataset(cfg["datasets"][0], wd)
        names = sorted(p.name for p in ds.scans.iterdir())[: a.scenes]
        print(f"generated {len(names)} rooms in {time.perf_counter() - t:.1f} s")
        sup = {n: np.flatnonzero(ds.scene(n).labels != IGNORE_INDEX) for n in names}
        net, _ = FT.build_network(cfg)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        dev = torch.device("cpu")
        verts = np.mean([len(ds.scene(n).xyz) for n in names])
        voxels = np.mean([len(FT.voxelise([(ds.scene(n).xyz, ds.scene(n).rgb)], a.voxel)["coords"]) for n in names])
        times = []
        for step in range(a.steps + 1):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, _ = FT.step_loss(net, None, ds, [names[step % len(names)]], sup, f, step, dev)
            loss.backward()
            opt.step()
            if step:
                times.append(time.perf_counter() - t)
        t = time.perf_counter()
        FT.evaluate(net, ds, names, a.voxel, dev)
        ev = (time.perf_counter() - t) / len(names)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"{a.model} at {a.voxel} m, {a.threads} thread(s): {verts:,.0f} vertices and {voxels:,.0f} voxels per scene"
        )
        print(f"train step (1 scene): {np.mean(times):.2f} s (min {np.min(times):.2f}, {len(times)} steps)")
        print(f"evaluate: {ev:.2f} s per scene")
        print(f"peak memory (max RSS): {peak:,.0f} MB")
    finally:
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
