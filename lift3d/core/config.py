"""Configuration: defaults from stages.yaml, a user file that sets only what it changes,
command-line overrides (``-o key.path=value``), and validation with clear errors.

Merging is Hydra-like: mappings merge key by key, lists and scalars replace. Validation
uses the defaults as the schema: a key not in the defaults is unknown (the error lists the
valid keys at that level), a value must have its default's type (a null default accepts
anything). Dataset entries are checked against the common keys plus the reader's own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from lift3d.core.errors import ConfigError
from lift3d.core.registry import READERS, RegistryError

# stages.yaml ships inside the package (lift3d/stages.yaml links to the top-level file in a checkout)
DEFAULTS_PATH = Path(os.environ.get("LIFT3D_DEFAULTS", Path(__file__).resolve().parent.parent / "stages.yaml"))
STAGES = ("frames", "teacher", "points", "pretrain", "finetune", "distill2d")
# keys whose value is a free-form mapping (not checked key by key)
FREE_FORM = {"sweeps", "cluster.jobqueue"}
DATASET_COMMON = {
    "name": str,
    "kind": str,
    "root": (str, type(None)),
    "frame_skip": int,
    "split": str,
    "image_size": (list, type(None)),
}
SPLITS = ("train", "val", "all")


class StrictLoader(yaml.SafeLoader):
    """YAML with the booleans of YAML 1.2: true / false only. YAML 1.1 also reads yes, no, on and off
    as booleans, so a typo would pass silently; here they stay strings and a boolean key refuses them."""


StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=StrictLoader)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def defaults() -> dict:
    return load_yaml(DEFAULTS_PATH)


def merge(base: dict, over: dict) -> dict:
    """Deep-merge ``over`` into a copy of ``base``: mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def apply_override(cfg: dict, item: str) -> None:
    """Apply one ``key.path=value`` (value parsed as YAML; list items by index: datasets.0.root)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    path, raw = item.split("=", 1)
    keys = [k for k in path.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override {item!r}: empty key in {path!r}")
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    node: Any = cfg
    for i, key in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            node = node[_index(node, key, where)]
        elif isinstance(node, dict):
            if key not in node or node[key] is None:
                node[key] = {}
            node = node[key]
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(keys[:i])!r} is a {type(node).__name__}, not a mapping")
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, path)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {item!r}: cannot set {last!r} inside a {type(node).__name__}")


def _index(seq: list, key: str, where: str) -> int:
    try:
        idx = int(key)
    except ValueError:
        raise ConfigError(f"{where}: {key!r} indexes a list; use a number 0..{len(seq) - 1}") from None
    if not 0 <= idx < len(seq):
        raise ConfigError(f"{where}: index {idx} out of range (the list has {len(seq)} items)")
    return idx


def _type_name(t) -> str:
    names = {
        type(None): "null",
        dict: "mapping",
        list: "list",
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
    }
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def _matches(value, expected) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, bool):
            continue
        if isinstance(value, t):
            return True
    return False


def _check(value, default, where: str) -> None:
    if default is None or where in FREE_FORM:
        return
    expected = type(default)
    if not _matches(value, expected):
        raise ConfigError(
            f"{where}: got {value!r} ({_type_name(type(value))}), expected {_type_name(expected)} (default {default!r})"
        )
    if isinstance(default, dict):
        for key, val in value.items():
            sub = f"{where}.{key}" if where else str(key)
            if key not in default:
                raise ConfigError(
                    f"unknown key {sub!r}; valid keys{' at ' + repr(where) if where else ''}: "
                    f"{', '.join(sorted(map(str, default)))}"
                )
            _check(val, default[key], sub)


def check_dataset(entry, i: int, where_list: str = "datasets") -> None:
    where = f"{where_list}.{i}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a dataset entry must be a mapping, got {entry!r}")
    for key in ("name", "kind"):
        if key not in entry:
            raise ConfigError(f"{where}: missing required key {key!r}")
    if entry["kind"] not in READERS:
        raise ConfigError(f"{where}.kind: unknown kind {entry['kind']!r}; valid kinds: {', '.join(READERS.names())}")
    allowed = dict(DATASET_COMMON)
    try:
        allowed.update(READERS.get(entry["kind"]).extra_keys)  # the readers own their extra keys
    except RegistryError as exc:
        raise ConfigError(f"{where}.kind: {exc}") from None
    for key, val in entry.items():
        if key not in allowed:
            raise ConfigError(
                f"unknown key {where}.{key!r} for kind {entry['kind']!r}; valid keys: {', '.join(sorted(allowed))}"
            )
        if val is not None and not _matches(val, allowed[key]):
            raise ConfigError(
                f"{where}.{key}: got {val!r} ({_type_name(type(val))}), expected {_type_name(allowed[key])}"
            )
    if entry["kind"] != "synthetic" and not entry.get("root"):
        raise ConfigError(f"{where} ({entry['name']}): kind {entry['kind']!r} needs 'root', the dataset's folder")
    if "frame_skip" in entry and entry["frame_skip"] < 1:
        raise ConfigError(f"{where}.frame_skip: must be >= 1, got {entry['frame_skip']}")
    if entry.get("split", "all") not in SPLITS:
        raise ConfigError(f"{where}.split: got {entry['split']!r}, expected one of {', '.join(SPLITS)}")


def validate(cfg: dict, base: dict | None = None) -> dict:
    base = defaults() if base is None else base
    _check(cfg, base, "")
    datasets = cfg.get("datasets") or []
    if not datasets:
        raise ConfigError("datasets: at least one dataset entry is needed")
    names = set()
    for where, entries in dataset_lists(cfg):
        for i, entry in enumerate(entries):
            check_dataset(entry, i, where)
            if entry["name"] in names:
                raise ConfigError(
                    f"{where}.{i}.name: {entry['name']!r} is used twice; names must be unique "
                    f"(over datasets and fit2d.datasets)"
                )
            names.add(entry["name"])
    return cfg


def dataset_lists(cfg: dict) -> list[tuple[str, list]]:
    """The dataset entry lists of a configuration: ``datasets`` (the 3D side) and
    ``fit2d.datasets`` (the 2D corpus a fitted teacher learns from; its 3D data is never read)."""
    return [("datasets", cfg.get("datasets") or []), ("fit2d.datasets", (cfg.get("fit2d") or {}).get("datasets") or [])]


def load(config: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Defaults <- user file <- overrides, validated. Dataset entries get frame_skip/split defaults."""
    base = defaults()
    cfg = copy.deepcopy(base)
    if config:
        cfg = merge(cfg, load_yaml(config))
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg, base)
    for entry in [e for _, entries in dataset_lists(cfg) for e in entries]:
        entry.setdefault("frame_skip", 25 if entry["kind"] in ("scannet", "synthetic") else 1)
        entry.setdefault("split", "all")
        entry.setdefault("root", None)
        for key, val in READERS.get(entry["kind"]).defaults.items():  # part of the stores' identity
            entry.setdefault(key, val)
    return cfg


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def workdir(cfg: dict) -> Path:
    return Path(cfg["workdir"]).expanduser()


def resolve_path(cfg: dict, value: str) -> Path:
    """A path from a setting: absolute as it is; relative, the first of <workdir>/value and
    ./value that exists (else the workdir one, whose error then names both)."""
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        return p
    for base in (workdir(cfg), Path.cwd()):
        if (base / p).exists():
            return base / p
    return workdir(cfg) / p
