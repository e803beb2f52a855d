"""A small PLY reader (binary little/big endian and ASCII): vertex properties and triangle faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lift3d.pipeline.readers.base import ReaderError

_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}


def _parse_header(data: bytes, path: Path):
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ReaderError(f"{path}: not a PLY file (no 'ply' magic or no end_header)")
    nl = data.find(b"\n", end)
    body = nl + 1 if nl >= 0 else len(data)
    fmt, elements = None, []
    for line in data[:end].decode("ascii", "replace").splitlines():
        w = line.split()
        if not w or w[0] in ("comment", "obj_info", "ply"):
            continue
        if w[0] == "format":
            fmt = w[1]
        elif w[0] == "element":
            elements.append({"name": w[1], "count": int(w[2]), "props": []})
        elif w[0] == "property":
            if not elements:
                raise ReaderError(f"{path}: PLY property before any element")
            if w[1] == "list":
                elements[-1]["props"].append((w[4], "list", _TYPES[w[2]], _TYPES[w[3]]))
            else:
                if w[1] not in _TYPES:
                    raise ReaderError(f"{path}: unknown PLY property type {w[1]!r}")
                elements[-1]["props"].append((w[2], _TYPES[w[1]]))
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise ReaderError(f"{path}: unsupported PLY format {fmt!r}")
    return fmt, elements, body


def read_ply(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(vertex properties by name, faces (F, 3) int64 or None). Faces must be triangles."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read: {exc.strerror or exc}") from None
    fmt, elements, pos = _parse_header(data, path)
    if fmt == "ascii":
        return _read_ascii(data[pos:].decode("ascii", "replace"), elements, path)
    end = "<" if fmt == "binary_little_endian" else ">"
    vertex, faces = {}, None
    for el in elements:
        scalar = all(len(p) == 2 for p in el["props"])
        if scalar:
            dt = np.dtype([(p[0], end + p[1]) for p in el["props"]])
            need = dt.itemsize * el["count"]
            if pos + need > len(data):
                raise ReaderError(
                    f"{path}: truncated PLY ({el['name']} needs {need} bytes at {pos}, file has {len(data)})"
                )
            arr = np.frombuffer(data, dt, el["count"], pos)
            pos += need
            if el["name"] == "vertex":
                vertex = {n: arr[n].astype(arr[n].dtype.newbyteorder("=")) for n in arr.dtype.names}
        elif el["name"] == "face" and len(el["props"]) == 1:
            _, _, ct, it = el["props"][0]
            dt = np.dtype([("n", end + ct), ("i", end + it, (3,))])
            need = dt.itemsize * el["count"]
            arr = np.frombuffer(data, dt, el["count"], pos) if pos + need <= len(data) else None
            if arr is None or (arr["n"] != 3).any():
                raise ReaderError(f"{path}: PLY faces are not all triangles (or the file is truncated)")
            faces = arr["i"].astype(np.int64)
            pos += need
        else:
            break  # later elements (edges, ...) are not needed
    if not vertex:
        raise ReaderError(f"{path}: PLY has no vertex element")
    return vertex, faces


def _read_ascii(text: str, elements, path: Path):
    lines = iter(text.splitlines())
    vertex, faces = {}, None
    for el in elements:
        rows = [next(lines, "").split() for _ in range(el["count"])]
        if el["name"] == "vertex":
            try:
                arr = np.array(rows, np.float64)
            except ValueError:
                raise ReaderError(f"{path}: malformed ASCII PLY vertex rows") from None
            for j, p in enumerate(el["props"]):
                vertex[p[0]] = arr[:, j].astype(p[1])
        elif el["name"] == "face":
            if any(r[0] != "3" for r in rows):
                raise ReaderError(f"{path}: PLY faces are not all triangles")
            faces = np.array([r[1:4] for r in rows], np.int64)
    return vertex, faces
