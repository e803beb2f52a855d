"""``kind: synthetic``: the procedural rooms of :mod:`lift3d.pipeline.synthetic`, generated once into
``<workdir>/raw/<name>`` and read by the ScanNet reader."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from lift3d.pipeline.readers import scannet
from lift3d.pipeline.readers.base import ReaderError
from lift3d.pipeline.readers.common import entry_image_size
from lift3d.pipeline.synthetic.write import DEFAULTS, VERSION, generate, room_seed


class Reader(scannet.Reader):
    """``kind: synthetic``: generate into ``<workdir>/raw/<name>`` once (again if its options
    change), then read it with the unchanged ScanNet reader."""

    kind = "synthetic"
    extra_keys = {
        "scenes": int,
        "seed": int,
        "frames_per_scene": int,
        "depth_size": list,
        "jpeg_quality": int,
        "mesh_spacing": float,
        "color_align": str,
    }
    MARKER = "COMPLETE.json"

    def __init__(self, entry: dict, workdir: Path):
        super().__init__(entry, workdir)
        self.options = {
            "scenes": int(entry.get("scenes") or 6),
            "seed": int(entry.get("seed") or 0),
            "frames_per_scene": int(entry.get("frames_per_scene") or DEFAULTS["frames_per_scene"]),
            "depth_size": [int(x) for x in (entry.get("depth_size") or DEFAULTS["depth_size"])],
            "jpeg_quality": int(entry.get("jpeg_quality") or DEFAULTS["jpeg_quality"]),
            "mesh_spacing": float(entry.get("mesh_spacing") or DEFAULTS["mesh_spacing"]),
            "version": VERSION,
        }
        self.options_sha256 = hashlib.sha256(json.dumps(self.options, sort_keys=True).encode()).hexdigest()
        self.root = Path(entry["root"]) if entry.get("root") else Path(workdir) / "raw" / entry["name"]

    def is_prepared(self) -> bool:
        marker = self.root / self.MARKER
        try:
            return json.loads(marker.read_text()).get("options_sha256") == self.options_sha256
        except (OSError, ValueError):
            return False

    def prepare(self) -> None:
        if self.is_prepared():
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root.with_name(f"{self.root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        o = self.options
        generate(
            tmp, o["scenes"], o["seed"], o["depth_size"], o["frames_per_scene"], o["jpeg_quality"], o["mesh_spacing"]
        )
        (tmp / self.MARKER).write_text(
            json.dumps({"options": o, "options_sha256": self.options_sha256}, sort_keys=True)
        )
        old = self.root.with_name(f"{self.root.name}.old-{os.getpid()}")
        if self.root.exists():
            self.root.rename(old)  # a stale or half-written copy is moved aside, then removed
        try:
            tmp.rename(self.root)  # the complete dataset appears in one step
        except OSError:
            if not self.is_prepared():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same generation first
        shutil.rmtree(old, ignore_errors=True)

    def scenes(self) -> list[str]:
        if not self.is_prepared():
            self.prepare()
        return super().scenes()

    def stored_size(self) -> tuple[int, int]:
        return entry_image_size(self.entry) or tuple(self.options["depth_size"])

    def scene_key(self, scene: str) -> tuple:
        """A generated room is its seed: two entries share a room exactly when they share a seed."""
        return ("synthetic room", room_seed(self.options["seed"], int(scene[len("scene") : len("scene") + 4])))

    def labels_2d(self):
        """The generated label-filt images (as ``kind: scannet``); None before the dataset is generated."""
        if not (self.root / "scans").is_dir():
            return None
        if not self.is_prepared():
            raise ReaderError(
                f"{self.root}: the synthetic dataset on disk was generated with other options (or not "
                f"completely); run the frames stage, which generates it again, before reading its labels"
            )
        return super().labels_2d()

    def frames(self, scene: str, frame_skip: int):
        if not self.is_prepared():
            raise ReaderError(
                f"{self.root}: the synthetic dataset is not generated (or its options changed); "
                f"run the frames stage, which prepares it first"
            )
        return super().frames(scene, frame_skip)
