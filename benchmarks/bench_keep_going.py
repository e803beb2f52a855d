"""What one bad scene costs a frames run that keeps going: the wall time of a 12-scene run with
one truncated ``.sens`` (``skip_failed_scenes: true``, so it commits the other 11) against the same
run with the file intact, alternated, plus the bad scene's own task time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_keep_going.py [--scenes 12] [--workers 2]

The bad file holds its first half: the reader decodes those frames, then fails at the truncation.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lift3d.core import config as C  # noqa: E402
from lift3d.core.malloc import tune_script  # noqa: E402
from lift3d.pipeline import frames as F  # noqa: E402
from lift3d.pipeline.synthetic import generate  # noqa: E402


def run(root: Path, wd: Path, workers: int) -> tuple[float, dict]:
    shutil.rmtree(wd, ignore_errors=True)
    cfg = C.load(
        None,
        [
            f"workdir={wd}",
            f"datasets=[{{name: s, kind: scannet, root: '{root}', split: all, frame_skip: 1}}]",
            f"cluster.n_workers={workers}",
            "skip_failed_scenes=true",
        ],
    )
    t0 = time.perf_counter()
    (row,) = F.run(cfg)
    return time.perf_counter() - t0, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--frames", type=int, default=60, help="frames per scene")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_keep_going-"))
    try:
        good = generate(tmp / "good", scenes=a.scenes, seed=0, frames_per_scene=a.frames)
        bad = tmp / "bad"
        shutil.copytree(good, bad)
        victim = sorted(p for p in (bad / "scans").iterdir())[a.scenes // 2]
        sens = victim / f"{victim.name}.sens"
        data = sens.read_bytes()
        sens.write_bytes(data[: len(data) // 2])
        times = {"intact": [], "one bad scene": []}
        for _ in range(a.trials):  # alternated, so drift in the machine's speed hits both alike
            for name, root in (("intact", good), ("one bad scene", bad)):
                seconds, row = run(root, tmp / "wd", a.workers)
                times[name].append(seconds)
                frames = row["frames"]
                print(f"{name:14s} {seconds:6.2f} s  {frames} frames committed  skipped {row['skipped']}")
        per_scene = min(times["intact"]) / a.scenes
        extra = min(times["one bad scene"]) - min(times["intact"])
        print(f"\n{a.scenes} scenes x {a.frames} frames, {a.workers} workers, best of {a.trials}:")
        print(f"  intact          {min(times['intact']):6.2f} s  ({per_scene:.2f} s per scene)")
        print(f"  one bad scene   {min(times['one bad scene']):6.2f} s  (difference {extra:+.2f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    tune_script()
    main()
