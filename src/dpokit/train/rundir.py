"""The run directory and everything written into it: logging, the resolved config, metrics.jsonl, the data
report, the model card and ``final/``.

    RUN/config.yaml        the resolved configuration
    RUN/metrics.jsonl      one JSON object per logged step
    RUN/data_report.json   what loading and tokenization kept, truncated and skipped
    RUN/train.log          the log
    RUN/checkpoints/       resumable checkpoints (dpokit.train.checkpoint)
    RUN/final/             the trained model, tokenizer and model card
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit import __version__, distributed
from dpokit.config import Config, save_config
from dpokit.distributed import Dist
from dpokit.losses import OPTION_KEYS
from dpokit.models import pick_device, resolve_precision
from dpokit.resolved import card_base_model, config_header, resolve_run_config
from dpokit.safety import RedactFilter, redact
from dpokit.train import checkpoint as ckpt

log = logging.getLogger("dpokit")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (a notebook or a test harness may have replaced it since)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(run_dir: Path | None = None) -> None:
    logger = logging.getLogger("dpokit")
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(f, RedactFilter) for f in logger.filters):
        logger.addFilter(RedactFilter())
    if not any(getattr(h, "_dpokit", None) == "console" for h in logger.handlers):
        h = _Stderr()
        h.setFormatter(fmt)
        h._dpokit = "console"  # type: ignore[attr-defined]
        logger.addHandler(h)
    if run_dir is not None:
        target = str(run_dir / "train.log")
        for h in list(logger.handlers):
            if getattr(h, "_dpokit", None) == "file":
                logger.removeHandler(h)
                h.close()
        fh = logging.FileHandler(target)
        fh.setFormatter(fmt)
        fh._dpokit = "file"  # type: ignore[attr-defined]
        logger.addHandler(fh)
    logger.propagate = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Session:
    """A run being set up: its config, directory, device, effective precision, the checkpoint it resumes, and
    this process's place among the ranks (only rank 0 writes the run directory)."""

    cfg: Config
    run_dir: Path
    device: torch.device
    precision: str
    resume_from: Path | None
    stage: str
    dist: Dist = distributed.ONE
    extend: bool = False  # --extend: a resume may change the run's length (the schedule is rebuilt)


MARKER = ".dpokit"  # in every run directory dpokit makes: {"created": true} when this run made the directory
LOCK = ".lock"
# what a dpokit run writes into its directory: what --overwrite may replace (nothing else is ever removed)
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "data_report.json", "train.log", "run.json", "report.html",
               "checkpoints", "final", "tensorboard", "wandb", "mlruns", "eval", MARKER,
               "rounds", "online.json", "summary.md", "rl.json")  # dpokit online / rl
_LOCKS: dict[str, Any] = {}  # run directory -> the open lock file, held until the process ends


def _inputs(cfg: Config) -> list[tuple[str, str]]:
    out = [("model.name_or_path", cfg.model.name_or_path), ("model.ref_name_or_path", cfg.model.ref_name_or_path)]
    out += [("data.train_files", f) for f in cfg.data.train_files]
    out += [("data.eval_files", f) for f in cfg.data.eval_files]
    return [(k, v) for k, v in out if v and Path(v).exists()]


def claim_run_dir(run_dir: Path, cfg: Config, resume: str | None, overwrite: bool) -> bool:
    """Make sure ``run_dir`` is this run's to write, and lock it; returns whether this run made it.

    Refused: the file system root or the home directory; a directory that is or contains the model, the reference
    or a data file; a non-empty directory that is not a dpokit run (unless resuming it), or a finished or stopped
    run (unless ``--resume`` or ``--overwrite``); a directory another dpokit process is writing (a lock, released
    when that process ends). ``--overwrite`` removes only what a dpokit run writes (``RUN_ENTRIES``).
    """
    import fcntl
    import shutil

    from dpokit.errors import ConfigError

    target = run_dir.resolve()
    if target == Path(target.anchor) or target == Path.home().resolve():
        raise ConfigError(f"output_dir={run_dir}: refusing to use {target} as a run directory; name a new one")
    for key, value in _inputs(cfg):
        source = Path(value).resolve()
        if source == target or target in source.parents:
            raise ConfigError(f"output_dir={run_dir} is or contains {key}={value}: the run would write over what it "
                              "reads; choose another output directory")
    created = not target.exists() or not any(target.iterdir())
    ours = (target / MARKER).exists() or (target / "config.yaml").is_file() and (target / "checkpoints").is_dir()
    if not created:
        if not ours:
            raise ConfigError(f"output_dir={run_dir} is not empty and is not a dpokit run directory; choose an empty "
                              "or new directory (nothing in it is touched)")
        if not resume and not overwrite:
            raise ConfigError(f"output_dir={run_dir} holds a previous run; continue it with --resume, replace it with "
                              "--overwrite, or choose another output directory")
    target.mkdir(parents=True, exist_ok=True)
    handle = (target / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"output_dir={run_dir} is being written by another dpokit run ({holder}); wait for it to "
                          "end or choose another output directory") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    _LOCKS[str(target)] = handle
    if overwrite and not created and not resume:
        for name in RUN_ENTRIES:
            entry = target / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    if created:
        (target / MARKER).write_text(json.dumps({"created": True}))
    elif not (target / MARKER).exists():
        (target / MARKER).write_text(json.dumps({"created": False}))
    return created


def release_run_dir(run_dir: Path) -> None:
    """Let go of the run directory's lock (at the end of the run; a process that dies lets go by itself)."""
    handle = _LOCKS.pop(str(run_dir.resolve()), None)
    if handle is not None:
        handle.close()


def discard_unstarted(run_dir: Path) -> None:
    """A run that failed before its first step leaves no directory behind, if it made the directory itself."""
    import shutil

    try:
        made = json.loads((run_dir / MARKER).read_text()).get("created")
    except (OSError, ValueError):
        return
    if made and not any((run_dir / name).exists() for name in ("metrics.jsonl", "checkpoints", "final")):
        release_run_dir(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def open_session(cfg: Config, resume: str | None, stage: str, overwrite: bool = False,
                 extend: bool = False) -> Session:
    cfg.validate(stage)
    place, device = distributed.setup(cfg.train.distributed, cfg.train.dist_timeout, cfg.model.device)
    device = device or pick_device(cfg.model.device)
    run_dir = Path(cfg.output_dir)
    precision = resolve_precision(cfg.precision, device)
    given, cfg = cfg, resolve_run_config(cfg, stage, precision)  # config.yaml says what runs: lr, precision

    def prepare() -> Path | None:  # rank 0 owns the run directory; every rank resumes the same checkpoint
        claim_run_dir(run_dir, cfg, resume, overwrite)
        setup_logging(run_dir)
        found = ckpt.find_resume(run_dir, resume)
        # the run's own config.yaml is never overwritten: a resume writes its config beside it
        name = "config.yaml" if found is None or not (run_dir / "config.yaml").exists() \
            else f"config.resume-step-{found.name[5:]}.yaml"
        save_config(cfg, run_dir / name, header=config_header(cfg, given, device))
        return found

    resume_from = distributed.on_main(prepare, place)
    seed_everything(cfg.train.seed)
    log.info("run directory %s; device %s; precision %s", run_dir, device, precision)
    if extend and resume_from is None:
        from dpokit.errors import ConfigError

        raise ConfigError("--extend continues a run from a checkpoint: give --resume too")
    return Session(cfg, run_dir, device, precision, resume_from, stage, place, extend)


# ------------------------------------------------------------------------------------- metrics
def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop logged lines past the resumed step so the log reads as one run; a line that is not a JSON
    object (torn by a kill in the middle of a write) is dropped and named."""
    if not path.exists():
        return
    keep = []
    for n, ln in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(ln) if ln.strip() else None
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if ln.strip():
                log.warning("%s:line %d is not a complete metrics line (a write cut short); dropped", path, n)
            continue
        if record.get("step", 0) <= step:
            keep.append(ln)
    path.write_text("".join(ln + "\n" for ln in keep))


class RunLog:
    """What rank 0 writes while a stage runs: each metrics line to ``metrics.jsonl`` and the trackers of
    ``train.report_to`` (same keys and values), the progress to ``run.json``, and ``report.html`` within its cost
    budget (``dpokit.report.ReportWriter``: under 2% of wall time). Other ranks hold one that writes nothing."""

    def __init__(self, session: Session, steps_total: int, start: int, loss: str | None = None):
        from dpokit.config import to_dict
        from dpokit.report import ReportWriter, write_run_info
        from dpokit.trackers import open_trackers

        self.session, self.active = session, session.dist.main
        self.closed = not self.active
        if not self.active:
            return
        cfg, d = session.cfg, session.cfg.data
        write_run_info(
            session.run_dir, stage=session.stage, model=cfg.model.name_or_path,
            reference=cfg.model.ref_name_or_path or (None if session.stage == "sft" else cfg.model.name_or_path),
            data={"train": d.train_files, "eval": d.eval_files},
            loss={"name": "rloo" if session.stage == "rl" else cfg.loss.name, "beta": cfg.loss.beta}
            if session.stage != "sft" else {"name": "sft"},
            steps_total=steps_total, steps_done=start, status="running", device=str(session.device),
            precision=session.precision, layout=cfg.train.layout, world_size=session.dist.world)
        self.report = ReportWriter(session.run_dir)
        self.trackers = open_trackers(cfg.train.report_to, session.run_dir, to_dict(cfg), start_step=start)

    def record(self, record: dict[str, Any]) -> None:
        """One metrics line (a training step's, or the held-out evaluation's)."""
        if not self.active:
            return
        from dpokit.report import write_run_info

        append_metrics(self.session.run_dir, record)
        self.trackers.log(record, int(record["step"]))
        write_run_info(self.session.run_dir, steps_done=int(record["step"]))
        self.report.maybe_write()

    def close(self, status: str, error: str | None = None) -> None:
        """The run ended (finished, interrupted or failed): the final report, the trackers closed."""
        if self.closed:
            return
        from dpokit.report import write_run_info

        self.closed = True
        write_run_info(self.session.run_dir, status=status, **({"error": error} if error else {}))
        self.report.maybe_write(force=True)
        r = self.report  # what the report cost this run, kept where a user (and a benchmark) can read it
        cost = {"render_s": round(r.spent, 3), "renders": r.writes, "share": round(r.spent / max(r.elapsed, 1e-9), 5)}
        write_run_info(self.session.run_dir, report_cost=cost)
        log.info("report.html: %d renders, %.1f s (%.2f%% of %.0f s)", r.writes, r.spent, 100 * cost["share"],
                 r.elapsed)
        self.trackers.close()


# ---------------------------------------------------------------------------------- data report
def update_data_report(run_dir: Path, key: str, value: Any) -> None:
    reports = run_dir / "data_report.json"
    existing = json.loads(reports.read_text()) if reports.exists() else {}
    existing[key] = value
    reports.write_text(json.dumps(existing, indent=1))


# --------------------------------------------------------------------------------------- export
def _inline(value: Any) -> str:
    """A value from the config as one line of Markdown text: no line breaks (they could start new front-matter
    or Markdown blocks) and no backticks (they could close the code span)."""
    return " ".join(str(value).split()).replace("`", "'")


def model_card(cfg: Config, stage: str, metrics: dict[str, float], extra: str = "") -> str:
    base = _inline(cfg.model.name_or_path)
    hub_base = card_base_model(cfg.model.name_or_path)  # a hub id or nothing: never a local path
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    data = ", ".join(_inline(f) for f in cfg.data.train_files) or "(none)"
    return f"""---
library_name: transformers
tags: [dpokit, {stage}]
{f"base_model: {hub_base}" + chr(10) if hub_base else ""}---
# {stage.upper()} model trained with dpokit {__version__}

- **Stage:** {stage}
- **Started from:** `{base}`
- **Reference:** `{_inline(cfg.model.ref_name_or_path or base)}` {"(frozen copy of the start)" if not
    cfg.model.ref_name_or_path else ""}
- **Training data:** {data}
- **Loss:** `{_inline(cfg.loss.name)}`, beta = {cfg.loss.beta}{_loss_options(cfg)}
- **Steps:** {cfg.train.max_steps or f"{cfg.train.epochs or 1} epoch(s)"}, batch {cfg.train.batch_size} \
(grad_accum {cfg.train.grad_accum}), lr {cfg.train.lr}, seed {cfg.train.seed}, precision {cfg.precision}

Last logged metrics: `{json.dumps(shown)}`
{extra}
The full resolved configuration is in the run directory's `config.yaml`; per-step metrics in `metrics.jsonl`.
"""


def _loss_options(cfg: Config) -> str:
    lc = cfg.loss
    shown = [f"{k} = {getattr(lc, k)}" for k in OPTION_KEYS if getattr(lc, k) is not None]
    shown += [f"rpo_alpha = {lc.rpo_alpha}"] if lc.rpo_alpha else []
    shown += ["reference-free"] if lc.reference_free else []
    return "".join(", " + s for s in shown)


def export(session: Session, model: Any, tokenizer: Any, card: str) -> Path:
    """``final/``: gathered on rank 0 (a full state dict, offloaded to CPU) and written there alone."""
    out = ckpt.export_final(session.run_dir / "final", model, tokenizer, redact(card), session.dist,
                            session.cfg.train.final_dtype)
    if session.dist.main:
        log.info("final model written to %s", out)
    return out
