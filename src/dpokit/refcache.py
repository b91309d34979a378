"""Reference log-probs on disk, under a content hash of everything they depend on, verified before use.

The key hashes the reference weights (every tensor's name, shape, dtype and bytes) and config, the
precision, the layout setting, and every micro-batch the values were computed over: its (example,
slot) rows and every tensor of its laid-out token ids and targets. Change any of them and the key
changes; the same run again, another epoch or another run on the same data and reference reuses the
file. A file is trusted only if it has the expected number of rows and its values match the SHA-256
stored beside them; otherwise it is named in the log and recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("dpokit")
VERSION = "v3"


def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return f"{tuple(t.shape)}{t.dtype}".encode() + t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy(
    ).tobytes()


def cache_key(model_hash: str, precision: str, layout: str, batches: Sequence[Any]) -> str:
    """Key of the values of a reference (``model_hash``) over recipe ``batches`` in ``precision``/``layout``."""
    h = hashlib.sha256(f"{model_hash}|{precision}|{layout}|{VERSION}".encode())
    for b in batches:
        h.update(json.dumps([b.seqs.name, b.rows]).encode())
        for f in dataclasses.fields(b.seqs):
            value = getattr(b.seqs, f.name)
            if isinstance(value, torch.Tensor):
                h.update(_tensor_bytes(value))
    return h.hexdigest()[:32]


def default_dir() -> Path:
    root = os.environ.get("DPOKIT_CACHE") or str(Path.home() / ".cache" / "dpokit")
    return Path(root) / "refcache"


def _digest(table: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(table)).hexdigest()


def load(key: str, rows: int, root: Path | None = None) -> torch.Tensor | None:
    """The cached [rows, slots] table, or None when absent or failing verification (rows, checksum)."""
    path = (root or default_dir()) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        table = load_file(str(path))["logps"]
        ok = table.shape[0] == rows and int(meta.get("rows", -1)) == rows and meta.get("sha256") == _digest(table)
    except Exception as e:  # noqa: BLE001 - a cache: whatever is wrong with the file, it is recomputed
        log.warning("reference cache %s is unreadable (%s); recomputing it", path, e)
        return None
    if not ok:
        log.warning("reference cache %s failed verification (rows or checksum); recomputing it", path)
        return None
    log.info("reference log-probs: reusing %s (%d examples)", path, rows)
    return table


def store(key: str, table: torch.Tensor, root: Path | None = None) -> Path:
    """Write atomically (temporary file, then rename) with the row count and checksum beside the values."""
    root = root or default_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{key}.safetensors"
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    table = table.contiguous()
    save_file({"logps": table}, str(tmp), metadata={"rows": str(table.shape[0]), "sha256": _digest(table)})
    os.replace(tmp, path)
    return path
