"""Resumable checkpoints and the final Hugging Face export, written atomically and verified before use.

``checkpoints/step-N/`` holds the model and optimizer state, ``scheduler.pt``, ``rng.pt`` and
``state.json``. In one process the model is ``model.safetensors`` and the optimizer ``optimizer.pt``; under
a process group (torchrun, DDP or FSDP2) both are one ``torch.distributed.checkpoint`` directory ``dcp/``
written by every rank (each its own shard). Names are the unwrapped model's own parameter names with
optimizer state keyed by them, the same in every mode, so a checkpoint resumes at any world size, under
either engine, and in one process (DCP reshards; a one-process checkpoint is loaded full and sharded).

The protocol: everything is written into a temporary sibling directory; rank 0 then records every file's
size and SHA-256 in ``state.json`` (written last: the completion marker), flushes, and renames the directory
into place. A checkpoint whose marker is missing or unreadable, or whose files do not match their recorded
size (checked when listing) or checksum (checked before resuming from it), is named in the log and skipped.
Old checkpoints are removed by first renaming them out of the way, so a kill during pruning never leaves a
half-deleted ``step-N``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpokit.distributed import ONE, Dist, barrier, on_main

log = logging.getLogger("dpokit")

STATE_FILE = "state.json"
FORMAT = 2


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """name -> the first name of the same parameter, for parameters registered under several names."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """What training changes, by name: every parameter that takes gradients (a LoRA run: the adapters only; the
    frozen base is read again from the model on resume)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_model(model: torch.nn.Module, filename: str) -> None:
    """The trainable parameters of ``model`` in one safetensors file."""
    save_file({name: p.detach().contiguous() for name, p in trainable(model).items()}, filename)


def load_model(model: torch.nn.Module, filename: str) -> None:
    """Copy the saved trainable parameters into ``model``; every one must be there (tied names resolved)."""
    saved = load_file(filename)
    tied = _tied_names(model)
    wanted = trainable(model)
    for name, p in wanted.items():
        value = saved.get(name, saved.get(tied.get(name, ""), None))
        if value is None:
            raise ValueError(f"{filename}: no tensor for parameter {name!r}")
        with torch.no_grad():
            p.copy_(value)


def save_checkpoint(
    ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, state: dict[str, Any], keep_last: int, place: Dist = ONE,
) -> Path:
    """Write checkpoints/step-<step> atomically (every rank calls this under a process group) and prune to the
    newest ``keep_last``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, get_state_dict

    def start() -> str:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        name = f".step-{step}.tmp-{os.getpid()}"
        if (ckpt_root / name).exists():
            shutil.rmtree(ckpt_root / name)
        (ckpt_root / name).mkdir()
        return name

    tmp = ckpt_root / on_main(start, place)
    if place.active:
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        kind = "dcp"
    else:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(get_optimizer_state_dict(model, optimizer), tmp / "optimizer.pt")
        kind = "safetensors"
    barrier(place)

    def finish() -> Path:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        files = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        body = {**state, "step": step, "format": FORMAT, "kind": kind, "files": files}
        (tmp / STATE_FILE).write_text(json.dumps({**body, "checksum": _state_checksum(body)}, indent=1))
        _fsync_tree(tmp)
        final = ckpt_root / f"step-{step}"
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            _remove(old)
        return final

    return on_main(finish, place)


def _remove(path: Path) -> None:
    """Rename out of the way first, so a kill mid-removal leaves a stale temporary, never a damaged step-N."""
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _state_checksum(body: dict[str, Any]) -> str:
    """SHA-256 of state.json's own content (every field but this one), so a changed step or file list is caught."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((path / STATE_FILE).read_text())
        return state if isinstance(state, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def verify(path: Path, checksums: bool = True) -> str | None:
    """None when complete and undamaged; else what is wrong (missing marker, a file's size or checksum)."""
    state = _state(path)
    if state is None:
        return "no readable state.json (incomplete write)"
    if state.get("format") != FORMAT:
        return f"written by another dpokit version (format {state.get('format')!r}, this one reads {FORMAT})"
    if state.get("checksum") != _state_checksum({k: v for k, v in state.items() if k != "checksum"}):
        return f"{STATE_FILE}: checksum mismatch (the file changed after it was written)"
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        return "state.json lists no files"
    for name, meta in files.items():
        f = path / name
        try:
            if f.stat().st_size != meta["size"]:
                return f"{name}: size {f.stat().st_size} != recorded {meta['size']}"
            if checksums and sha256_file(f) != meta["sha256"]:
                return f"{name}: checksum mismatch (the file changed after it was written)"
        except (OSError, KeyError, TypeError):
            return f"{name}: missing or unreadable"
    return None


def remove_stale_temporaries(ckpt_root: Path) -> None:
    """Leftovers of a checkpoint write or removal that was killed: never valid, removed (and named) at start-up."""
    if not ckpt_root.is_dir():
        return
    for tmp in [*ckpt_root.glob(".step-*.tmp-*"), *ckpt_root.glob(".step-*.deleting-*")]:
        log.warning("removing %s: a checkpoint write or removal that never finished", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(ckpt_root: Path, checksums: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete or damaged ones are named in the log and skipped."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.glob("step-*"):
        if not p.is_dir() or not p.name[5:].isdigit():
            continue
        problem = verify(p, checksums)
        if problem is None:
            found.append(p)
        else:
            log.warning("skipping checkpoint %s: %s", p, problem)
    return sorted(found, key=lambda p: int(p.name[5:]))


def newest_good(ckpt_root: Path) -> Path | None:
    """The newest checkpoint whose every file matches its checksum (older ones are tried in turn)."""
    for p in reversed(list_checkpoints(ckpt_root)):
        problem = verify(p, checksums=True)
        if problem is None:
            return p
        log.warning("skipping checkpoint %s: %s; trying an older one", p, problem)
    return None


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """--resume with no value (or 'latest'): the newest good checkpoint of the run; 'auto': the same, or a fresh
    start when there is none (for torchrun --max-restarts); else the given path, verified."""
    if resume is None:
        return None
    if resume in ("", "latest", "auto"):
        found = newest_good(run_dir / "checkpoints")
        if found is None and resume != "auto":
            raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
        return found
    path = Path(resume)
    problem = verify(path)
    if problem is not None:
        raise FileNotFoundError(f"--resume {path}: not a complete checkpoint ({problem})")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    place: Dist = ONE) -> dict[str, Any]:
    """Load into ``model`` (plain, DDP-replicated or FSDP2-sharded) and ``optimizer``, from either format."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    state = json.loads((path / STATE_FILE).read_text())
    if state["kind"] == "dcp":
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        sd = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended, not a mistake
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=str(path / "dcp"), no_dist=not place.active)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
    elif place.active:  # a one-process checkpoint into a replicated or sharded model: full state, then placed
        full = load_file(str(path / "model.safetensors"))
        for name, first in _tied_names(model).items():  # safetensors keeps one name of a tied parameter
            if name not in full and first in full:
                full[name] = full[first]
            if first not in full and name in full:
                full[first] = full[name]
        options = StateDictOptions(full_state_dict=True, strict=False)
        missing = [n for n in trainable(model) if n not in full]
        if missing:
            raise ValueError(f"{path / 'model.safetensors'}: no tensor for parameters {missing[:3]}")
        set_model_state_dict(model, full, options=options)
        set_optimizer_state_dict(model, optimizer, torch.load(path / "optimizer.pt", weights_only=True),
                                 options=options)
    else:
        load_model(model, str(path / "model.safetensors"))
        set_optimizer_state_dict(model, optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state


def export_final(out: Path, model: Any, tokenizer: Any, card: str, place: Dist = ONE, dtype: str = "fp32") -> Path:
    """``final/``: loads with AutoModelForCausalLM.from_pretrained; tokenizer, chat template, model card; weights in
    ``dtype`` (fp32 or bf16).

    Under FSDP2 the full state dict is gathered first (every rank takes part; offloaded to CPU on rank 0), then
    rank 0 writes it; ``save_pretrained`` is never called on a sharded model's own tensors.
    """
    full = None
    if place.engine == "fsdp" or dtype == "bf16":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for name in _tied_names(model):  # written once, under the first name, as save_pretrained does
            full.pop(name, None)
        if dtype == "bf16":
            full = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in full.items()}

    def write() -> Path:
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        if full is not None:
            model.save_pretrained(tmp, state_dict=full)
        else:
            model.save_pretrained(tmp)
        if dtype == "bf16" and (tmp / "config.json").is_file():  # config.json says what the files hold
            config = json.loads((tmp / "config.json").read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = "bfloat16"
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        _fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out

    return on_main(write, place)


def save_snapshot(out: Path, model: Any, tokenizer: Any, step: int, place: Dist = ONE) -> Path:
    """``train.snapshot_steps``: the weights at ``step`` alone (no optimizer, scheduler or RNG state), as a model
    directory like ``final/`` (``from_pretrained``-loadable, tokenizer included), written atomically and never
    pruned: the points along training that a reward-KL frontier evaluates (``dpokit frontier``)."""
    card = f"Weights after step {step} of the dpokit run in `{out.parent.parent}` (train.snapshot_steps).\n"
    return export_final(out, model, tokenizer, card, place)
