"""One way to read torch files: ``torch.load(weights_only=True)``.

A pickle can run code while it loads, and a checkpoint or label file a user downloads is a
pickle. Every file lift3d reads goes through :func:`load`, which allows only tensors and
plain containers (plus numpy arrays where a format needs them, e.g. ScanNet's limited
annotation files). Anything else is refused with a message naming the file and the type.
lift3d's own files hold nothing else: RNG states are stored as tensors (:func:`rng_state`).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from lift3d.core.errors import CheckpointError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

# what an array pickled by numpy needs to be rebuilt, and nothing that can run code
NUMPY_GLOBALS = [_reconstruct, np.ndarray, np.dtype] + sorted(
    {
        type(np.dtype(t))
        for t in (
            np.bool_,
            np.int8,
            np.int16,
            np.int32,
            np.int64,
            np.uint8,
            np.uint16,
            np.uint32,
            np.uint64,
            np.float16,
            np.float32,
            np.float64,
        )
    },
    key=str,
)


def load(path: str | Path, what: str = "torch file", numpy: bool = False, error: type = CheckpointError):
    """The object in ``path``, read with ``weights_only=True`` (numpy arrays allowed when ``numpy``).
    A missing, truncated or unsafe file raises ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file (expected {what})")
    try:
        if numpy:
            with torch.serialization.safe_globals(NUMPY_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        msg = str(exc)
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        if any("GLOBAL" in ln for ln in lines):  # a class or function the allow-list does not hold
            first = next(ln for ln in lines if "GLOBAL" in ln)
            raise error(
                f"{path}: refused: it holds objects other than tensors and plain containers, "
                f"which could run code when loaded ({first}); expected {what}"
            ) from None
        first = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0] if lines else "")
        raise error(f"{path}: cannot be read as {what}: {type(exc).__name__}: {first}") from None


def state_dict_mismatch(own: dict, sd: dict) -> tuple[list[str], list[str], list[str]]:
    """How ``sd`` fails to fit a module whose state dict is ``own``: (keys missing from ``sd``,
    keys ``own`` lacks, "key: shape vs shape" for keys of another shape); all empty when it fits."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, shapes


def read_model_file(path: str | Path, error: type = CheckpointError, accept_checkpoint: bool = False) -> dict:
    """A lift3d ``model.pt`` (or a run folder holding one; a ``checkpoint.pt`` too when
    ``accept_checkpoint``) as a dict with a ``model`` state dict; ``path`` records where it was."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "model.pt"
    kinds = "a run folder, its model.pt" + (" or checkpoint.pt" if accept_checkpoint else "")
    if not p.is_file():
        raise error(f"{p}: no such checkpoint ({kinds})")
    state = load(p, f"a torch file (a lift3d model.pt: {kinds})", error=error)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        keys = list(state)[:5] if isinstance(state, dict) else "-"
        raise error(
            f"{p}: expected a lift3d model.pt (a dict with a 'model' state dict and 'model_name'); "
            f"got {type(state).__name__} with keys {keys}"
        )
    return {**state, "path": str(p)}


def rng_state() -> dict:
    """Every random generator a trainer draws from (python, numpy, torch, CUDA), as tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": _python_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in st:
        version, internal, gauss = st["python"]["version"], st["python"]["state"], st["python"]["gauss"]
        random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _python_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
