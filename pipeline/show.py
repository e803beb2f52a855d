"""``lift3d show``: look at one frame and its lifted points.

The PNG holds the frame's RGB, its depth (metres), and its points rendered from a second
viewpoint (a z-buffered splat from a camera turned ~30 degrees about the points' centre),
coloured by RGB and, when ``teacher.zarr/<teacher>/<dataset>`` exists, by the teacher's top
class at the cell covering each point's pixel. The points come from ``points.zarr`` when that
group is complete and made from the stored frames; otherwise they are lifted on the fly with
the current ``points`` settings (the title says which). ``ply=`` also writes the points as PLY
(x y z red green blue; metres, OpenCV camera frame), readable by MeshLab and Open3D.
"""

from __future__ import annotations

import colorsys
import logging
from pathlib import Path

import numpy as np

from lift3d.core.config import workdir as get_workdir
from lift3d.core.store import StoreError, lineage, open_group
from lift3d.pipeline.points import EQUIRECT, frame_points, lift_frame

log = logging.getLogger("lift3d")

PLY_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


def write_ply(path, coords: np.ndarray, colors: np.ndarray, ascii: bool = False, comment: str = "") -> None:
    """Write points as a PLY file: binary little-endian (default) or ASCII."""
    coords = np.asarray(coords, np.float32).reshape(-1, 3)
    colors = np.asarray(colors, np.uint8).reshape(-1, 3)
    if len(coords) != len(colors):
        raise ValueError(f"{len(coords)} coords but {len(colors)} colors")
    head = ["ply", f"format {'ascii' if ascii else 'binary_little_endian'} 1.0"]
    head += [f"comment {line}" for line in comment.splitlines() if line]
    head += [f"element vertex {len(coords)}"] + [f"property float {a}" for a in "xyz"]
    head += [f"property uchar {a}" for a in ("red", "green", "blue")] + ["end_header"]
    with open(path, "wb") as fh:
        fh.write(("\n".join(head) + "\n").encode("ascii"))
        if ascii:
            # %.9g round-trips float32 exactly
            lines = [
                f"{x:.9g} {y:.9g} {z:.9g} {r} {g} {b}\n"
                for (x, y, z), (r, g, b) in zip(coords.tolist(), colors.tolist())
            ]
            fh.write("".join(lines).encode("ascii"))
        else:
            rec = np.empty(len(coords), PLY_DTYPE)
            rec["x"], rec["y"], rec["z"] = coords[:, 0], coords[:, 1], coords[:, 2]
            rec["red"], rec["green"], rec["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]
            fh.write(rec.tobytes())


def teacher_cells(pixel: np.ndarray, h: int, w: int, hs: int, ws: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of the h x w teacher cell covering each (row, col) of an H x W frame (docs/stores.md)."""
    i = np.floor((pixel[:, 0].astype(np.float64) + 0.5) * hs / h).astype(np.int64)
    j = np.floor((pixel[:, 1].astype(np.float64) + 0.5) * ws / w).astype(np.int64)
    return np.clip(i, 0, hs - 1), np.clip(j, 0, ws - 1)


def class_colors(labels: np.ndarray) -> np.ndarray:
    """A fixed, distinct-ish RGB (float 0..1) per class id (golden-ratio hues)."""
    ids = np.unique(labels)
    table = {
        int(c): colorsys.hsv_to_rgb((int(c) * 0.618034) % 1.0, 0.75 if c % 2 else 0.55, 0.95 if c % 3 else 0.75)
        for c in ids
    }
    return np.array([table[int(c)] for c in labels], np.float64).reshape(-1, 3)


def _rot(axis: str, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def view_camera(coords: np.ndarray, panorama: bool, yaw: float = 30.0, pitch: float = -20.0):
    """(R, eye) of a camera turned ``yaw`` degrees about the points' centre (camera frame)."""
    if len(coords) == 0:
        return np.eye(3), np.zeros(3)
    center = np.median(coords.astype(np.float64), axis=0)
    if panorama:  # the points surround the camera: back off and look down on them
        dist = 2.0 * float(np.percentile(np.linalg.norm(coords - center, axis=1), 90)) + 1e-3
        pitch = -35.0
    else:
        dist = float(np.linalg.norm(center)) + 1e-3
    rot = _rot("y", -yaw) @ _rot("x", pitch)  # view camera axes in the frame's camera frame
    eye = center - rot @ np.array([0.0, 0.0, dist])
    return rot, eye


def splat(
    coords: np.ndarray,
    values: np.ndarray,
    rot: np.ndarray,
    eye: np.ndarray,
    k,
    size: tuple[int, int],
    radius: int = 1,
    background: float = 1.0,
) -> np.ndarray:
    """Z-buffered square splats of points seen by a pinhole camera (rot, eye, K = fx, fy, cx, cy)."""
    vh, vw = size
    img = np.full((vh, vw, values.shape[1]), background, np.float64)
    p = (coords.astype(np.float64) - eye) @ rot  # into the view camera's frame
    front = p[:, 2] > 1e-3
    p, vals = p[front], values[front]
    fx, fy, cx, cy = k
    u = np.round(fx * p[:, 0] / p[:, 2] + cx).astype(np.int64)
    v = np.round(fy * p[:, 1] / p[:, 2] + cy).astype(np.int64)
    offs = np.arange(-radius, radius + 1)
    du, dv = (a.reshape(-1) for a in np.meshgrid(offs, offs))
    uu, vv = (u[:, None] + du[None]).reshape(-1), (v[:, None] + dv[None]).reshape(-1)
    zz = np.repeat(p[:, 2], len(du))
    src = np.repeat(np.arange(len(p)), len(du))
    ok = (uu >= 0) & (uu < vw) & (vv >= 0) & (vv < vh)
    pix, zz, src = vv[ok] * vw + uu[ok], zz[ok], src[ok]
    order = np.lexsort((zz, pix))  # per pixel, nearest first
    pix, src = pix[order], src[order]
    first = np.ones(len(pix), bool)
    first[1:] = pix[1:] != pix[:-1]
    img.reshape(-1, values.shape[1])[pix[first]] = vals[src[first]]
    return img


def _consistent(child_attrs: dict, frames_attrs: dict) -> bool:
    """Was this group made from exactly these frames (lineage chain)?"""
    return child_attrs.get("lineage_sha256") == lineage(
        child_attrs.get("config_sha256"), frames_attrs.get("lineage_sha256")
    )


def show(cfg: dict, dataset: str, frame: int, out_png, ply=None, ply_ascii: bool = False) -> dict:
    """Write the PNG (and the PLY); returns what was shown: points, their source, the teacher."""
    from matplotlib.figure import Figure

    wd = get_workdir(cfg)
    frames = open_group(wd, "frames", dataset)
    n = frames["source_index"].shape[0]
    if not 0 <= frame < n:
        raise IndexError(f"frame {frame} out of range: frames.zarr/{dataset} has {n} frames (0..{n - 1})")
    fattrs = dict(frames.attrs)
    rgb, depth = frames["rgb"][frame], frames["depth"][frame]
    intr, proj = frames["intrinsics"][frame], int(frames["projection"][frame])
    h, w = depth.shape
    scene = fattrs.get("scenes", ["?"])[int(frames["scene_index"][frame])]
    try:
        pts = open_group(wd, "points", dataset)
        if not _consistent(dict(pts.attrs), fattrs):
            raise StoreError(f"points.zarr/{dataset} was made from other frames")
        coords, colors, pixel = frame_points(pts, frame)
        source = "points.zarr"
    except StoreError as exc:
        log.warning("show: %s; lifting frame %d now with the current points settings", exc, frame)
        s = cfg["points"]
        fp = lift_frame(rgb, depth, intr, proj, s["voxel_size"], s["min_depth"], s["max_depth"])
        coords, colors, pixel = fp.coords, fp.colors, fp.pixel
        source = "lifted now"
    labels, classes, tname = None, None, cfg["teacher"]["name"]
    try:
        t = open_group(wd, "teacher", f"{tname}/{dataset}")
        if not _consistent(dict(t.attrs), fattrs):
            raise StoreError(f"teacher.zarr/{tname}/{dataset} was made from other frames")
        top = t["soft_labels/index"][frame, 0]
        i, j = teacher_cells(pixel, h, w, *top.shape)
        labels = top[i, j].astype(np.int64)
        classes = t.attrs.get("classes")
    except (StoreError, KeyError) as exc:
        log.info("show: no teacher colouring (%s)", exc)

    panorama = proj == EQUIRECT
    if panorama:
        vh = h
        vw = int(round(h * 4 / 3))
        f = vw / (2 * np.tan(np.deg2rad(40)))
        k = (f, f, (vw - 1) / 2, (vh - 1) / 2)
    else:
        vh, vw, k = h, w, tuple(float(x) for x in intr)
    rot, eye = view_camera(coords, panorama)
    radius = max(1, int(round(min(vh, vw) / 240)))
    views = [("points, RGB, turned 30 deg", splat(coords, colors / 255.0, rot, eye, k, (vh, vw), radius))]
    if labels is not None:
        views.append((f"points, {tname} top class", splat(coords, class_colors(labels), rot, eye, k, (vh, vw), radius)))

    panels = 2 + len(views)
    fig = Figure(figsize=(4.2 * panels, 4.2 * max(h / w, vh / vw) + 0.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, panels)
    axes[0].imshow(rgb)
    axes[0].set_title("RGB")
    dm = np.where(depth > 0, depth / 1000.0, np.nan)
    im = axes[1].imshow(dm, cmap="turbo")
    axes[1].set_title("depth (m), " + ("distance along ray" if panorama else "z"))
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02)
    for ax, (title, img) in zip(axes[2:], views):
        ax.imshow(img)
        ax.set_title(title)
    if labels is not None:
        ids, cnt = np.unique(labels, return_counts=True)
        top_ids = ids[np.argsort(-cnt)][:8]
        cols = class_colors(top_ids)
        from matplotlib.patches import Patch

        names = [classes[c] if classes and c < len(classes) else str(c) for c in top_ids]
        axes[-1].legend(
            handles=[Patch(color=c, label=nm) for c, nm in zip(cols, names)],
            loc="lower left",
            fontsize=7,
            framealpha=0.8,
        )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{dataset} frame {frame} (scene {scene}, source frame {int(frames['source_index'][frame])}, "
        f"{'panorama' if panorama else 'pinhole'}) - {len(coords)} points from {source}",
        fontsize=10,
    )
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    if ply:
        Path(ply).parent.mkdir(parents=True, exist_ok=True)
        write_ply(
            ply,
            coords,
            colors,
            ascii=ply_ascii,
            comment=f"lift3d {dataset} frame {frame} (scene {scene}): metres, OpenCV camera frame",
        )
    return {
        "points": int(len(coords)),
        "source": source,
        "teacher": tname if labels is not None else None,
        "png": str(out_png),
        "ply": str(ply) if ply else None,
    }
