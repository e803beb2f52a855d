"""Frames stage throughput on ScanNet-sized .sens frames, next to the bare decode floor.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_frames.py [--scenes 8 --frames 66 --tmp /dev/shm]

Writes ScanNet-sized scenes (JPEG colour 1296x968, zlib depth 640x480) built from the synthetic
renderer, then measures per frame: (a) the floor, a full-size JPEG decode plus the zlib depth
decompression, (b) the ScanNet reader alone (reduced JPEG decode, resize, colour convert),
(c) the whole stage (reader + part write + commit) in-process and with 1 and 2 dask workers,
and the store's bytes per frame with the projection for ScanNet's ~100k subsampled frames.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

from lift3d.core import config as C
from lift3d.launch import tune_script
from lift3d.pipeline import frames as F
from lift3d.pipeline.readers.scannet import Reader
from lift3d.pipeline.synthetic.render import render
from lift3d.pipeline.synthetic.rooms import make_room, trajectory
from lift3d.pipeline.synthetic.write import write_sens

CH, CW, DH, DW = 968, 1296, 480, 640


def make_dataset(root: Path, scenes: int, frames: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for s in range(scenes):
        poses, attempt = None, 0
        while poses is None:  # a room whose camera path keeps clear of tall furniture
            boxes = make_room(np.random.default_rng(seed + 100 * s + attempt))
            poses = trajectory(boxes, frames, rng)
            attempt += 1
        k_small = np.array([0.8 * 320, 0.8 * 320, 159.5, 119.5])
        views = []
        for pose in poses[:: max(1, frames // 8)]:  # 8 distinct renders, reused along the sequence
            rgb, z, _ = render(boxes, pose, k_small, (240, 320), s)
            rgb = cv2.resize(rgb, (CW, CH), interpolation=cv2.INTER_LINEAR)
            grain = rng.integers(-12, 13, size=rgb.shape, dtype=np.int16)  # sensor-like detail for JPEG
            rgb = np.clip(rgb.astype(np.int16) + grain, 0, 255).astype(np.uint8)
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            depth = cv2.resize(np.rint(z * 1000).astype(np.uint16), (DW, DH), interpolation=cv2.INTER_NEAREST)
            views.append((pose, jpg.tobytes(), zlib.compress(depth.tobytes(), 6)))
        seq = [views[i % len(views)] for i in range(frames)]
        k_depth = np.array([577.6, 577.6, 319.5, 239.5])
        k_color = np.array([1170.2, 1170.2, 647.75, 483.75])
        name = f"scene{s:04d}_00"
        (root / "scans" / name).mkdir(parents=True, exist_ok=True)
        write_sens(root / "scans" / name / f"{name}.sens", k_color, k_depth, (CH, CW), (DH, DW), seq)


def floor_ms(root: Path) -> tuple[float, float]:
    """(ms per frame) full-size JPEG decode + zlib decompress, on the raw bytes."""
    import struct

    blobs = []
    for sens in sorted(root.glob("scans/*/*.sens")):
        data = sens.read_bytes()
        (n_name,) = struct.unpack_from("<Q", data, 4)
        pos = 12 + n_name + 256 + 8 + 16 + 4
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        for _ in range(n):
            cs, ds = struct.unpack_from("<QQ", data, pos + 64 + 16)
            pos += 96
            blobs.append((data[pos : pos + cs], data[pos + cs : pos + cs + ds]))
            pos += cs + ds
    t0 = time.perf_counter()
    for cb, db in blobs:
        cv2.imdecode(np.frombuffer(cb, np.uint8), cv2.IMREAD_COLOR)
        np.frombuffer(zlib.decompress(db), np.uint16)
    full = (time.perf_counter() - t0) / len(blobs) * 1e3
    t0 = time.perf_counter()
    for cb, db in blobs:
        cv2.imdecode(np.frombuffer(cb, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
        np.frombuffer(zlib.decompress(db), np.uint16)
    reduced = (time.perf_counter() - t0) / len(blobs) * 1e3
    return full, reduced


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--frames", type=int, default=66, help="kept frames per scene (ScanNet: ~66 at frame_skip 25)")
    ap.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="configuration override, e.g. -o frames.zstd_level=3",
    )
    ap.add_argument(
        "--tmp",
        default=None,
        help="folder for the data and stores (default: the system's "
        "temporary folder); /dev/shm takes the disk out of the measurement",
    )
    a = ap.parse_args()
    cv2.setNumThreads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-frames-", dir=a.tmp))
    try:
        root = tmp / "scannet"
        make_dataset(root, a.scenes, a.frames)
        total = a.scenes * a.frames
        full, reduced = floor_ms(root)
        entry = {"name": "bench", "kind": "scannet", "root": str(root), "frame_skip": 1, "split": "all"}
        reader = Reader(entry, tmp)
        t0 = time.perf_counter()
        n = sum(1 for s in reader.scenes() for _ in reader.frames(s, 1))
        reader_ms = (time.perf_counter() - t0) / n * 1e3
        print(f"frames: {total} ScanNet-sized frames (colour {CW}x{CH} JPEG, depth {DW}x{DH} zlib), 1 thread per core")
        print(f"floor, full-size JPEG + zlib decode : {full:6.2f} ms/frame  ({1e3 / full:6.1f} frames/s/core)")
        print(f"      reduced-size JPEG + zlib      : {reduced:6.2f} ms/frame  ({1e3 / reduced:6.1f} frames/s/core)")
        print(
            f"ScanNet reader (decode, resize, RGB): {reader_ms:6.2f} ms/frame  ({1e3 / reader_ms:6.1f} frames/s/core)"
        )
        rates, work_rates = {}, {}
        for workers in (0, 1, 2):
            wd = tmp / f"w{workers}"
            cfg = C.load(None, [f"workdir={wd}", f"cluster.n_workers={workers}", *a.override])
            cfg["datasets"] = [entry]
            t0 = time.perf_counter()
            row = F.run(cfg)[0]
            wall = time.perf_counter() - t0
            rates[workers] = total / wall
            # the work: tasks (from the first submitted on warm workers) plus the commit
            work = row["tasks_wall_seconds"] + row["commit_seconds"]
            work_rates[workers] = total / work
            label = "in-process" if workers == 0 else f"dask, {workers} worker{'s' if workers > 1 else ''}"
            print(
                f"stage ({label:16s}): {total / work:6.1f} frames/s (tasks {row['tasks_wall_seconds']:5.2f} s "
                f"+ commit {row['commit_seconds']:4.2f} s = {row['commit_seconds'] * 1e3 / total:4.2f} ms/frame); "
                f"per core inside tasks {total / row['task_seconds']:6.1f} frames/s/core; cluster start "
                f"{row['cluster_seconds']:4.2f} s; wall {wall:5.2f} s ({total / wall:6.1f} frames/s)"
            )
        print(
            f"scaling 1 -> 2 dask workers: {work_rates[2] / work_rates[1]:.2f}x (tasks + commit, warm workers); "
            f"{rates[2] / rates[1]:.2f}x of the whole wall time incl. cluster start"
        )
        group = tmp / "w0" / "frames.zarr" / "bench"
        nbytes = sum(p.stat().st_size for p in group.rglob("*") if p.is_file())
        per = nbytes / total
        print(f"store: {per / 1e6:.3f} MB/frame at 640x480 -> {per * 100_000 / 1e9:.1f} GB for ScanNet's ~100k frames")
        print(
            f"in-process end to end vs the full-size decode floor: {(1e3 / rates[0]) / full:.2f}x the floor's time "
            f"({rates[0]:.1f} frames/s/core)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    tune_script()  # the malloc settings the lift3d command runs with (lift3d.launch)
    main()
