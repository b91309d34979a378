"""What a run depends on, recorded in every checkpoint, and the check that a resume computes what the
uninterrupted run would have computed.

A checkpoint records ``depends_on``: the resolved config, and fingerprints of the training examples (their
token ids), of the model and of the reference (their files). On resume the same is computed again and
compared; what differs is named, and refused where the resumed run could not be exact:

* the data, the model or the reference changed: refused;
* a config key that changes what a step computes (lr, batch, loss, data budget, precision, layout, seed, ...)
  differs: refused;
* keys that change only where and how results are written or how fast they come (``MAY_DIFFER``: save and log
  cadence, trackers, the engine and its timeout, compilation, ...): allowed, and logged;
* the run's length (``train.max_steps`` / ``train.epochs``) differs: refused, unless the resume says
  ``--extend``: then the learning-rate schedule is rebuilt for the new length from the resumed step on (the
  steps already done followed the old one, so the result is not the run a fresh start at the new length
  would give, and the log says so). A length that ends before the checkpoint's step is always refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from dpokit.config import Config, flat_items
from dpokit.errors import ConfigError

log = logging.getLogger("dpokit")

MAY_DIFFER = {
    "output_dir", "train.save_steps", "train.keep_last", "train.log_steps", "train.max_nonfinite",
    "train.displacement_nats", "train.report_to", "train.distributed", "train.dist_timeout", "train.compile",
    "train.gradient_checkpointing", "train.logit_chunk_tokens", "model.device", "model.trust_remote_code",
    "data.skip_bad_records", "data.max_field_chars", "data.eval_files", "data.eval_split", "train.final_dtype",
}
LENGTH = {"train.max_steps", "train.epochs"}
HEAD = 1 << 20  # bytes hashed at each end of a large file


def source_fingerprint(name_or_path: str | None) -> str | None:
    """A model (or reference) as it is on disk: every file's name and size, and the first and last MiB of each
    (the whole file when smaller); a hub id or alias stands for itself."""
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if not path.exists():
        return f"name:{name_or_path}"
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}|{size}|".encode())
        with f.open("rb") as fh:
            h.update(fh.read(HEAD))
            if size > 2 * HEAD:
                fh.seek(size - HEAD)
                h.update(fh.read(HEAD))
    return h.hexdigest()


def data_fingerprint(items: Sequence[Any]) -> str:
    """The training examples as training sees them: their token ids (so tokenization and truncation count)."""
    h = hashlib.sha256()
    for x in items:
        h.update(json.dumps(asdict(x) if is_dataclass(x) else repr(x), sort_keys=True, default=str).encode())
    return h.hexdigest()


def depends_on(cfg: Config, items: Sequence[Any]) -> dict[str, Any]:
    return {"config": {k: v for k, v in flat_items(cfg)}, "data": data_fingerprint(items),
            "model": source_fingerprint(cfg.model.name_or_path),
            "reference": source_fingerprint(cfg.model.ref_name_or_path)}


def check_resume(saved: dict[str, Any] | None, now: dict[str, Any], step: int, total: int, extend: bool) -> bool:
    """Raise ConfigError when resuming at ``step`` cannot give what the uninterrupted run would; returns whether
    the schedule is to be rebuilt (``--extend``). ``saved`` is the checkpoint's ``depends_on``."""
    if saved is None:
        raise ConfigError("the checkpoint records nothing of what its run depended on (written by an older dpokit); "
                          "it cannot be checked, so it is not resumed")
    if step > total:
        raise ConfigError(f"the checkpoint is at step {step} but this run ends at step {total}: a shorter run cannot "
                          "be resumed from a later step")
    changed = [what for what in ("data", "model", "reference") if saved.get(what) != now.get(what)]
    if changed:
        raise ConfigError(f"resume refused: the {' and the '.join(changed)} changed since the checkpoint was written "
                          f"(it would train on other {'inputs' if len(changed) > 1 else changed[0]}); start a new run")
    old, new = saved.get("config", {}), now["config"]
    differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    refused = [k for k in differ if k not in MAY_DIFFER and k not in LENGTH]
    if refused:
        shown = "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in refused[:6])
        raise ConfigError(f"resume refused: {shown}{' ...' if len(refused) > 6 else ''}. These change what a step "
                          "computes, so the resumed run would mix two runs; resume with the run's own "
                          "config.yaml, or start a new run")
    for k in differ:
        if k in MAY_DIFFER:
            log.info("resume: %s is %r now (%r when the checkpoint was written)", k, new.get(k), old.get(k))
    length = [k for k in differ if k in LENGTH]
    if length and not extend:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in length)
        raise ConfigError(f"resume refused: the run's length changed ({shown}), which changes the learning-rate "
                          "schedule; say --extend to continue with a schedule rebuilt for the new length, or resume "
                          "with the run's own length")
    if extend and not length:
        raise ConfigError("--extend: the run's length (train.max_steps / train.epochs) is the same as the "
                          "checkpoint's; there is nothing to extend")
    if length:
        log.warning("--extend: the learning-rate schedule is rebuilt for %d steps from step %d on; the steps before "
                    "followed the old length's schedule, so this is not the run a fresh start at the new length gives",
                    total, step)
    return bool(length)
