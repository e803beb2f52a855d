"""The Zarr stores: the contract between stages (docs/stores.md).

Writing follows the parallel-writer rule: each worker writes one *part* per scene (a small
Zarr group under ``<workdir>/.parts/<stage>/<group>/<lineage>/``, marked done only after its
arrays are written), and one committer assembles the parts in sorted scene order into the
final group, sets the attributes, and marks it ``complete`` last. A killed worker leaves a
part that is not done (redone on re-run); a killed committer leaves an incomplete group
(rebuilt from the parts on re-run). Parts live under the group's *lineage* hash, so output of
a different configuration is never mixed in.

Identity: ``config`` = the stage's own section plus the dataset entry; ``config_sha256`` =
sha256 of it as sorted-key JSON; ``upstream_sha256`` = the input group's ``config_sha256``;
``lineage_sha256`` = sha256 of (config_sha256, the upstream's lineage), so a change anywhere
upstream makes this group out of date.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec

from lift3d.core.config import sha256_json
from lift3d.core.errors import StoreError

log = logging.getLogger("lift3d")

SCHEMA_VERSION = 1
COPY_BYTES = 64 << 20  # bytes per block when the committer copies a part
GATHER_BYTES = 256 << 20  # arrays up to this size are gathered from all parts and written once
# which stage makes each store, for "missing input" messages
MAKER = {"frames": "frames", "teacher": "teacher", "points": "points"}


FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextmanager
def writing(path: Path, what: str = "write", resume: str = "finished parts are kept, the re-run resumes"):
    """Turn an OSError while writing under ``path`` into one StoreError naming the file and the
    cause (disk full, no permission, ...) and saying how to resume. Zarr's write errors often
    carry no file name ("[Errno 28] No space left on device"): this names it."""
    try:
        yield
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else Path(path)
        if where.name.endswith(".partial"):  # zarr's temporary file: name the folder it was for
            where = where.parent
        if exc.errno in FULL:
            hint = "the disk is full (or a quota / file size limit was hit): free space, then re-run"
        elif exc.errno in DENIED:
            hint = "no permission to write there: fix the permissions (or the workdir), then re-run"
        else:
            hint = "fix the cause, then re-run"
        raise StoreError(f"{where}: cannot {what}: {exc.strerror or exc}; {hint} ({resume})") from exc


def store_path(workdir: Path, store: str) -> Path:
    return Path(workdir) / f"{store}.zarr"


def lineage(config_sha: str, upstream_lineage: str | None, failed: list[str] | tuple = ()) -> str:
    """A group's identity chained with its upstream's. A group committed without some scenes (that
    failed, with ``skip_failed_scenes``) holds other contents than its configuration says: the
    failed scenes enter its lineage, so what was made from it goes out of date when they change."""
    base = sha256_json([config_sha, upstream_lineage])
    return sha256_json([base, sorted(failed)]) if failed else base


def failed_scenes(workdir: Path, store: str, group: str, config_sha: str) -> dict[str, str]:
    """The scenes a complete group of this configuration was committed without (scene -> reason)."""
    attrs = group_state(workdir, store, group) or {}
    if not attrs.get("complete") or attrs.get("config_sha256") != config_sha:
        return {}
    return dict(attrs.get("failed_scenes") or {})


def group_state(workdir: Path, store: str, group: str) -> dict | None:
    """The attributes of a group, or None when it does not exist."""
    path = store_path(workdir, store) / group
    if not (path / "zarr.json").exists():
        return None
    return dict(zarr.open_group(str(path), mode="r").attrs)


def open_group(workdir: Path, store: str, group: str, expect_lineage: str | None = None) -> zarr.Group:
    """Open a finished group for reading; refuse one that is missing, incomplete or stale."""
    path = store_path(workdir, store) / group
    attrs = group_state(workdir, store, group)
    maker = MAKER.get(store, store)
    if attrs is None:
        raise StoreError(f"{path} does not exist: run the '{maker}' stage first (lift3d run {maker})")
    if not attrs.get("complete"):
        raise StoreError(f"{path} is not marked complete (an interrupted run?): re-run 'lift3d run {maker}'")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema_version {attrs.get('schema_version')}, this lift3d reads "
            f"{SCHEMA_VERSION}: re-run 'lift3d run {maker}'"
        )
    if expect_lineage is not None and attrs.get("lineage_sha256") != expect_lineage:
        raise StoreError(
            f"{path} was made from another configuration or input (lineage "
            f"{str(attrs.get('lineage_sha256'))[:12]} != expected {expect_lineage[:12]}): "
            f"re-run 'lift3d run {maker}'"
        )
    return zarr.open_group(str(path), mode="r")


@contextmanager
def stage_lock(workdir: Path, stage: str):
    """One running instance per stage and workdir; a second one is refused with a message."""
    lockdir = Path(workdir) / ".locks"
    path = lockdir / f"{stage}.lock"
    with writing(path, "write the lock file", "nothing was written yet"):
        lockdir.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StoreError(
            f"stage '{stage}' is already running on {workdir} ({holder}); wait for it to finish or stop it, then re-run"
        ) from None
    try:
        with writing(path, "write the lock file", "nothing was written yet"):
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
    except StoreError:
        fh.close()
        raise
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def array_paths(group: zarr.Group) -> list[str]:
    """Every array in ``group``, nested ones included, by path ("features", "soft_labels/prob").

    Parts and the committed group may hold arrays in subgroups: a name with a "/" creates the
    subgroup on the way (``PartWriter.append(**{"soft_labels/prob": a})``), and ``commit``
    rebuilds the same layout in the final group.
    """
    return [path for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)]


class GroupWriter:
    """Per-scene parts and the committer for one dataset group of one store."""

    def __init__(
        self,
        workdir: Path,
        store: str,
        group: str,
        config: dict,
        upstream_sha256: str | None = None,
        upstream_lineage: str | None = None,
        failed: list[str] | tuple = (),
    ):
        self.workdir = Path(workdir)
        self.store = store
        self.group = group
        self.config = config
        self.config_sha256 = sha256_json(config)
        self.upstream_sha256 = upstream_sha256
        self.failed = sorted(failed)
        self.lineage_sha256 = lineage(self.config_sha256, upstream_lineage, self.failed)
        self.path = store_path(workdir, store) / group
        self.parts_root = self.workdir / ".parts" / store / group
        # the parts depend on the configuration only, not on which scenes failed
        self.parts_dir = self.parts_root / lineage(self.config_sha256, upstream_lineage)[:16]
        self.recover()

    # -- state --------------------------------------------------------------------------
    @property
    def new_path(self) -> Path:
        """Where a rebuild is assembled, beside the group it replaces (swapped in at commit)."""
        return self.path.with_name(self.path.name + ".new")

    @property
    def old_path(self) -> Path:
        return self.path.with_name(self.path.name + ".old")

    def recover(self) -> None:
        """Finish a swap a kill interrupted: the group is missing but its replacement is complete
        (or, before that, the old group was moved aside): put the right one in place."""
        if self.path.exists():
            shutil.rmtree(self.old_path, ignore_errors=True)
            return
        for candidate in (self.new_path, self.old_path):
            meta = candidate / "zarr.json"
            if meta.exists() and json.loads(meta.read_text()).get("attributes", {}).get("complete"):
                os.replace(candidate, self.path)
                break
        shutil.rmtree(self.old_path, ignore_errors=True)

    def check_replace(self, rebuild: bool, why: str = "") -> None:
        """Refuse to replace a complete group made by another configuration unless ``rebuild``:
        such a store can be hours of GPU time. The message names the changed keys, its size and age."""
        attrs = group_state(self.workdir, self.store, self.group)
        if not attrs or not attrs.get("complete"):
            return
        if attrs.get("lineage_sha256") == self.lineage_sha256 and not why:
            return
        if not why:
            changed = diff_keys(attrs.get("config", {}), self.config)
            why = (
                ("made by another configuration (" + ", ".join(changed[:6]) + ")")
                if changed
                else ("made from another input (upstream changed)")
            )
        if rebuild:
            log.info(
                "%s.zarr/%s: %s; rebuilding it (--rebuild): the old store stays readable until the new one is "
                "complete, then removing it",
                self.store,
                self.group,
                why,
            )
            return
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        age = (time.time() - (self.path / "zarr.json").stat().st_mtime) / 3600
        raise StoreError(
            f"{self.store}.zarr/{self.group} ({size / 1e9:.2f} GB, made {age:.1f} h ago) was {why}; it is "
            f"not replaced silently: re-run with --rebuild (or -o rebuild=true) to rebuild it (the old store "
            f"stays readable until the new one is complete), or restore the old settings"
        )

    def up_to_date(self) -> bool:
        attrs = group_state(self.workdir, self.store, self.group)
        return bool(
            attrs
            and attrs.get("complete")
            and attrs.get("lineage_sha256") == self.lineage_sha256
            and attrs.get("schema_version") == SCHEMA_VERSION
        )

    def prepare_parts(self) -> None:
        """Drop parts made under any other configuration; keep this one's (resume)."""
        if self.parts_root.exists():
            for other in self.parts_root.iterdir():
                if other.name != self.parts_dir.name:
                    shutil.rmtree(other, ignore_errors=True)
        with writing(self.parts_dir, "create the parts folder"):
            self.parts_dir.mkdir(parents=True, exist_ok=True)

    def part_path(self, scene: str) -> Path:
        return self.parts_dir / f"{scene}.zarr"

    def part_done(self, scene: str) -> bool:
        path = self.part_path(scene)
        if not (path / "zarr.json").exists():
            return False
        return bool(zarr.open_group(str(path), mode="r").attrs.get("done"))

    # -- commit -------------------------------------------------------------------------
    def commit(
        self,
        scenes: list[str],
        attrs: dict,
        ragged: tuple[str, ...] = (),
        chunks: dict[str, tuple] | None = None,
        extra: dict[str, np.ndarray] | None = None,
        keep_parts: bool = False,
    ) -> dict:
        """Assemble the done parts of ``scenes`` (sorted) into the final group.

        Per-frame arrays are concatenated along axis 0; a part's ``scene_index`` is rewritten to
        the scene's position in the sorted list. Arrays named in ``ragged`` are concatenated too,
        and ``offsets`` (N + 1) is rebuilt from each part's ``counts``. ``extra`` arrays (not per
        frame, e.g. a fitted projection) are written as they are. Returns the summed skips.
        ``keep_parts``: leave the parts after the commit (a group committed without failed scenes
        is re-committed from them when a failed scene later succeeds).
        """
        scenes = sorted(scenes)
        missing = [s for s in scenes if not self.part_done(s)]
        if missing:
            raise StoreError(f"cannot commit {self.path}: parts not done for scenes {missing[:5]}")
        with writing(self.path, "write the final group"):
            return self._commit(scenes, attrs, ragged, chunks or {}, extra or {}, keep_parts)

    def _commit(
        self,
        scenes: list[str],
        attrs: dict,
        ragged: tuple[str, ...],
        chunks: dict,
        extra: dict[str, np.ndarray],
        keep_parts: bool = False,
    ) -> dict:
        parts = [zarr.open_group(str(self.part_path(s)), mode="r") for s in scenes]
        skipped: Counter = Counter()
        for p in parts:
            skipped.update(p.attrs.get("skipped", {}))
        names = [n for n in array_paths(parts[0]) if n != "counts"] if parts else []
        totals = {n: sum(p[n].shape[0] for p in parts) for n in names}
        # the new group is assembled beside the old one and swapped in when complete: a kill or a
        # failure during a rebuild leaves the old store as it was
        target = self.new_path
        if target.exists():
            shutil.rmtree(target)
        root = zarr.open_group(str(store_path(self.workdir, self.store)), mode="a")
        # create intermediate groups (e.g. teacher.zarr/<teacher>/)
        node = root
        *parents, leaf = self.group.split("/")
        for piece in parents:
            node = node.require_group(piece)
        group = node.require_group(leaf + ".new")
        group.attrs.update({"complete": False})
        for n in names:
            ref = parts[0][n]
            shape = (totals[n],) + tuple(ref.shape[1:])
            ch = chunks.get(n) or (max(1, ref.chunks[0]),) + tuple(ref.shape[1:])
            arr = group.create_array(
                n,
                shape=shape,
                chunks=ch,
                dtype=ref.dtype,
                fill_value=ref.fill_value,
                compressors=ref.compressors,
                filters=ref.filters,
                serializer=ref.serializer,
                chunk_key_encoding=ref.metadata.chunk_key_encoding,
            )
            linkable = n != "scene_index" and all(_same_layout(p[n], arr) for p in parts)
            row_bytes = ref.dtype.itemsize * int(np.prod(ref.shape[1:]))
            if not linkable and totals[n] * row_bytes <= GATHER_BYTES:
                # small per-frame arrays (poses, indices): gathered in memory, written once, so
                # the committer never rewrites a chunk once per part
                blocks = [
                    np.full(p[n].shape[0], i, dtype=np.int32) if n == "scene_index" else p[n][...]
                    for i, p in enumerate(parts)
                ]
                if totals[n]:
                    arr[...] = np.concatenate(blocks, axis=0)
                continue
            pos = 0
            for scene_i, p in enumerate(parts):
                m = p[n].shape[0]
                if linkable:  # encoded chunks carry over as they are: hard-link them, no re-encoding
                    _link_chunks(
                        Path(p.store.root) / p.path / n,
                        target / n,
                        pos,
                        m,
                        len(shape),
                        ref.metadata.chunk_key_encoding.separator,
                    )
                    pos += m
                    continue
                step = max(1, COPY_BYTES // max(1, row_bytes))
                for start in range(0, m, step):  # bounded memory per copy, few partial-chunk writes
                    stop = min(m, start + step)
                    if n == "scene_index":
                        block = np.full(stop - start, scene_i, dtype=np.int32)
                    else:
                        block = p[n][start:stop]
                    arr[pos + start : pos + stop] = block
                pos += m
        if ragged:
            counts = np.concatenate([p["counts"][...] for p in parts]) if parts else np.zeros(0, np.int64)
            offsets = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            group.create_array("offsets", data=offsets, chunks=(max(1, len(offsets)),))
        for n, data in extra.items():
            group.create_array(n, data=np.asarray(data), chunks=np.asarray(data).shape or None)
        group.attrs.update(
            {
                **attrs,
                "schema_version": SCHEMA_VERSION,
                "config": self.config,
                "config_sha256": self.config_sha256,
                "upstream_sha256": self.upstream_sha256,
                "lineage_sha256": self.lineage_sha256,
                "skipped": dict(sorted(skipped.items())),
                "scenes": attrs.get("scenes", scenes),  # a stage whose parts are not scenes passes its own
            }
        )
        group.attrs.update({"complete": True})  # last: readers refuse the group until now
        if self.path.exists():
            os.replace(self.path, self.old_path)
        os.replace(target, self.path)
        shutil.rmtree(self.old_path, ignore_errors=True)
        if not keep_parts:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        return dict(skipped)


def _same_layout(src: zarr.Array, dst: zarr.Array) -> bool:
    """True when src's encoded chunks are valid chunks of dst: one row per chunk, same codecs."""
    if src.chunks[0] != 1 or tuple(src.chunks) != tuple(dst.chunks):
        return False
    meta_s = json.loads((Path(src.store.root) / src.path / "zarr.json").read_text())
    meta_d = json.loads((Path(dst.store.root) / dst.path / "zarr.json").read_text())
    keys = ("codecs", "fill_value", "data_type", "chunk_key_encoding")
    return all(meta_s.get(k) == meta_d.get(k) for k in keys)


def _link_chunks(src: Path, dst: Path, offset: int, rows: int, ndim: int, sep: str = "/") -> None:
    """Place chunk j of ``src`` as chunk offset + j of ``dst`` (hard link; copy across devices).

    Both use zarr v3's default chunk keys with separator ``sep`` (``c/j/0/0`` or ``c.j.0.0``).
    Links leave the part intact, so a committer killed half-way can start again from the parts.
    Chunks that were never written (all fill value) are absent in both.
    """
    tail = ["0"] * (ndim - 1)
    for j in range(rows):
        s = src / sep.join(["c", str(j), *tail])
        if not s.exists():
            continue
        d = dst / sep.join(["c", str(offset + j), *tail])
        if sep == "/":
            d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(s, d)
        except OSError:
            shutil.copyfile(s, d)


class RowChunks:
    """One array of a part written one row per chunk, each chunk encoded and written here.

    Zarr's own write path costs about as much per chunk as encoding a 640x480 frame (its
    asynchronous machinery, in Python, holding the GIL). This encodes a row exactly as the
    array's codecs say (``bytes`` little-endian, then ``zstd``; numcodecs releases the GIL) and
    writes it at the array's chunk key ``c.<row>.0...``: zarr v3's default key encoding with
    the "." separator, every chunk file in the array's folder, no folder per chunk. ``close``
    writes the array's metadata with the final row count and checks that it names the codecs
    used. Plain zarr reads the result, and the committer hard-links the chunks.
    """

    def __init__(self, group: zarr.Group, name: str, tail: tuple, dtype, compressor=None):
        self.group, self.name = group, name
        self.tail, self.dtype = tuple(int(t) for t in tail), np.dtype(dtype)
        self.level = 0 if compressor is None else int(compressor.level)
        self.checksum = False if compressor is None else bool(compressor.checksum)
        self.codec = Zstd(level=self.level, checksum=self.checksum)
        self.dir = Path(group.store.root) / group.path / name
        self.rows = 0

    def write(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.shape[1:] != self.tail or block.dtype != self.dtype:
            raise ValueError(f"{self.dir}: rows of {block.dtype} {block.shape[1:]}, expected {self.dtype} {self.tail}")
        block = np.ascontiguousarray(block, dtype=self.dtype.newbyteorder("<"))
        zeros = ["0"] * len(self.tail)
        self.dir.mkdir(parents=True, exist_ok=True)
        for row in block:
            with open(self.dir / ".".join(["c", str(self.rows), *zeros]), "wb") as fh:
                fh.write(self.codec.encode(np.ascontiguousarray(row)))
            self.rows += 1

    def close(self) -> None:
        self.group.create_array(
            self.name,
            shape=(self.rows,) + self.tail,
            chunks=(1,) + self.tail,
            dtype=self.dtype,
            fill_value=0,
            compressors=ZstdCodec(level=self.level, checksum=self.checksum),
            chunk_key_encoding={"name": "default", "separator": "."},
        )
        codecs = json.loads((self.dir / "zarr.json").read_text())["codecs"]
        names = [c["name"] for c in codecs]
        endian = codecs[0].get("configuration", {}).get("endian", "little") if codecs else None
        zconf = codecs[-1].get("configuration", {}) if codecs else {}
        if (
            names != ["bytes", "zstd"]
            or endian != "little"
            or zconf.get("level") != self.level
            or bool(zconf.get("checksum")) != self.checksum
        ):
            raise StoreError(
                f"{self.dir}: zarr wrote codecs {codecs}, but the chunks were encoded as "
                f"bytes(little) + zstd(level={self.level}, checksum={self.checksum})"
            )


class PartWriter:
    """Append-only writer for one scene's part; ``finish`` marks it done (last).

    Arrays named in ``direct`` are written one row per chunk as they are appended
    (:class:`RowChunks`: no buffering, no zarr overhead per chunk, hard-linked by the
    committer); the others are buffered and written through zarr on ``flush``.
    """

    def __init__(
        self,
        path: Path,
        chunk_rows: dict[str, int] | None = None,
        compressors: dict | None = None,
        direct: tuple[str, ...] = (),
    ):
        """``compressors``: per array name, a zarr compressor (e.g. ZstdCodec(level=1)); the final
        group keeps each part's codecs, so its chunks are hard-linked, never re-encoded."""
        self.path = Path(path)
        self.compressors = compressors or {}
        with writing(self.path, "write the part"):
            if self.path.exists():
                shutil.rmtree(self.path)  # a part that was not done is redone from scratch
            self.group = zarr.open_group(str(self.path), mode="w")
        self.chunk_rows = chunk_rows or {}
        self.direct = set(direct)
        self.rows_direct: dict[str, RowChunks] = {}
        self.buffers: dict[str, list[np.ndarray]] = {}
        self.skipped: Counter = Counter()
        self.rows = 0

    def append(self, **arrays: np.ndarray) -> None:
        for name, a in arrays.items():
            if name in self.direct:
                a = np.asarray(a)
                if name not in self.rows_direct:
                    self.rows_direct[name] = RowChunks(
                        self.group, name, a.shape[1:], a.dtype, self.compressors.get(name)
                    )
                with writing(self.path, "write the part"):
                    self.rows_direct[name].write(a)
                continue
            self.buffers.setdefault(name, []).append(np.asarray(a))

    def flush(self) -> None:
        with writing(self.path, "write the part"):
            self._flush()

    def _flush(self) -> None:
        for name, blocks in self.buffers.items():
            if not blocks:
                continue
            data = np.concatenate(blocks, axis=0)
            if name in self.group:
                self.group[name].append(data, axis=0)
            else:
                rows = self.chunk_rows.get(name, 1)
                kw = {"compressors": self.compressors[name]} if name in self.compressors else {}
                self.group.create_array(name, data=data, chunks=(rows,) + data.shape[1:], **kw)
            blocks.clear()

    def finish(self, templates: dict[str, tuple[tuple, np.dtype]], **attrs) -> None:
        """Flush; create empty arrays (0 rows) from ``templates`` for anything never appended."""
        self.flush()
        with writing(self.path, "write the part"):
            for rc in self.rows_direct.values():
                rc.close()
            for name, (tail, dtype) in templates.items():
                if name in self.group or name in self.rows_direct:
                    continue
                if name in self.direct:
                    RowChunks(self.group, name, tail, dtype, self.compressors.get(name)).close()
                    continue
                rows = self.chunk_rows.get(name, 1)
                self.group.create_array(name, shape=(0,) + tuple(tail), chunks=(rows,) + tuple(tail), dtype=dtype)
            self.group.attrs.update({**attrs, "skipped": dict(self.skipped)})
            self.group.attrs.update({"done": True})


def diff_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (with old -> new)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += diff_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]
