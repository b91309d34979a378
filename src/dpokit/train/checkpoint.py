"""Resumable checkpoints and the final Hugging Face export, written atomically.

``checkpoints/step-N/`` holds ``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``,
``rng.pt`` and ``state.json``; it is written into a temporary sibling directory, flushed, and
renamed into place, with ``state.json`` (the completion marker) written last. A directory
without a readable ``state.json`` is incomplete and is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

log = logging.getLogger("dpokit")

STATE_FILE = "state.json"


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, state: dict[str, Any], keep_last: int,
) -> Path:
    """Write checkpoints/step-<step> atomically and prune to the newest ``keep_last``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    sizes = {f.name: f.stat().st_size for f in tmp.iterdir()}
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "file_sizes": sizes}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _valid(path: Path) -> bool:
    """Complete and undamaged: the marker parses and every file has the size recorded when it was written."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        sizes = state["file_sizes"]
        return all((path / name).stat().st_size == size for name, size in sizes.items()) and all(
            name in sizes for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_stale_temporaries(ckpt_root: Path) -> None:
    """Leftovers of a checkpoint write that was killed: never valid, removed (and named) at start-up."""
    if not ckpt_root.is_dir():
        return
    for tmp in ckpt_root.glob(".step-*.tmp-*"):
        log.warning("removing %s: a checkpoint write that never finished", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones are named in the log and skipped."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.glob("step-*"):
        if not p.is_dir() or not p.name[5:].isdigit():
            continue
        if _valid(p):
            found.append(p)
        else:
            log.warning("skipping incomplete or damaged checkpoint %s", p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """--resume with no value (or 'latest'): newest complete checkpoint of the run; else the given path."""
    if resume is None:
        return None
    if resume in ("", "latest", "auto"):
        ckpts = list_checkpoints(run_dir / "checkpoints")
        if not ckpts:
            if resume == "auto":
                return None
            raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
        return ckpts[-1]
    path = Path(resume)
    if not _valid(path):
        raise FileNotFoundError(f"--resume {path}: not a complete checkpoint directory")
    return path


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    load_model(model, str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


def export_final(
    out: Path, model: Any, tokenizer: Any, card: str,
) -> Path:
    """``final/``: loads with AutoModelForCausalLM.from_pretrained; tokenizer, chat template, model card."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    _fsync_dir(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
