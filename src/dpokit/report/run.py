"""A run directory as the report reads it: ``run.json`` (written here), and every other file read back.

Nothing in this module needs torch: a report can be rebuilt on a machine without it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
EVAL_DIR = "eval"  # `dpokit eval --out RUN/eval` puts eval_report.json, per_example.jsonl, samples.jsonl here
STATUSES = ("running", "finished", "interrupted", "failed")
RUN_FIELDS: dict[str, str] = {
    "stage": "sft or dpo",
    "model": "the policy's starting point (model.name_or_path)",
    "reference": "the reference model, or null (a frozen copy of the start, or none)",
    "data": "{'train': [files], 'eval': [files]}",
    "loss": "{'name': ..., 'beta': ..., options set}",
    "steps_done": "optimizer steps finished",
    "steps_total": "optimizer steps the run will take",
    "status": "running | finished | interrupted | failed",
    "error": "one line, when status is failed or interrupted",
    "started": "ISO 8601 time of the first write (kept on later writes)",
    "updated": "ISO 8601 time of the latest write (set on every write)",
    "wall_time_s": "seconds of training so far (default: updated - started)",
    "device": "e.g. cpu, cuda:0",
    "precision": "precision actually used (fp32 or bf16), after precision=auto is resolved",
    "layout": "padded | packed | shared_prompt",
    "world_size": "processes (torchrun)",
    "report_cost": "{'render_s', 'renders', 'share'}: what writing report.html cost, share of the wall time",
    "versions": "{'dpokit': ..., 'torch': ..., ...} (filled in on the first write)",
}
VERSIONED = ("dpokit", "torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "matplotlib")


def library_versions() -> dict[str, str]:
    """Python and the installed versions of the libraries a run depends on (absent ones left out)."""
    from dpokit.resolved import versions

    return versions(VERSIONED)


def atomic_write(path: Path, text: str) -> Path:
    """Write to a temporary file beside ``path``, then rename over it: a reader sees the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _now() -> datetime:
    return datetime.now(timezone.utc).astimezone()


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` as a dict; {} when absent or unreadable."""
    path = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_run_info(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``RUN/run.json`` (atomically) and return the merged record.

    Keys are those of ``RUN_FIELDS``; an unknown key or status is a ValueError (a typo in the
    caller, never silently stored). ``started`` and ``versions`` are filled in on the first
    write, ``updated`` on every write, ``wall_time_s`` from them unless given.
    """
    unknown = sorted(set(fields) - set(RUN_FIELDS))
    if unknown:
        raise ValueError(f"run.json: unknown field(s) {unknown}; known: {sorted(RUN_FIELDS)}")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"run.json: status must be one of {STATUSES}, got {fields['status']!r}")
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    info.update(fields)
    now = _now()
    info.setdefault("started", now.isoformat(timespec="seconds"))
    info.setdefault("versions", library_versions())
    info["updated"] = now.isoformat(timespec="seconds")
    if "wall_time_s" not in fields:
        try:
            info["wall_time_s"] = round((now - datetime.fromisoformat(info["started"])).total_seconds(), 3)
        except (TypeError, ValueError):
            info.pop("wall_time_s", None)
    atomic_write(run_dir / RUN_FILE, json.dumps(info, indent=1, default=str))
    return info


# ----------------------------------------------------------------------------------- reading
@dataclass
class Run:
    """Everything the report shows, read from one run directory. Absent parts are empty and named in
    ``missing``; unreadable lines are skipped and named in ``problems`` (never dropped silently)."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, in order
    config: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    data_report: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # RUN/eval/eval_report.json
    samples: list[dict[str, Any]] = field(default_factory=list)  # RUN/eval/samples.jsonl
    per_example: list[dict[str, Any]] = field(default_factory=list)  # RUN/eval/per_example.jsonl
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def stage(self) -> str:
        if self.info.get("stage"):
            return str(self.info["stage"])
        keys = {k for r in self.records for k in r}
        if "logps/completion" in keys:
            return "sft"
        if any(k.startswith("rewards/") or k == "kl" for k in keys):
            return "dpo"
        return "unknown"

    def cfg(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def steps_done(self) -> int | None:
        if isinstance(self.info.get("steps_done"), int):
            return self.info["steps_done"]
        steps = [r["step"] for r in self.records if isinstance(r.get("step"), (int, float))]
        return int(max(steps)) if steps else None

    @property
    def steps_total(self) -> int | None:
        value = self.info.get("steps_total", self.cfg("train.max_steps"))
        return int(value) if isinstance(value, (int, float)) else None

    @property
    def status(self) -> str:
        if self.info.get("status"):
            return str(self.info["status"])
        return "finished" if (self.path / "final").is_dir() else "unknown"


def read_jsonl(path: Path, what: str, problems: list[str]) -> list[dict[str, Any]]:
    """JSON objects, one a line (split on \\n only); a line that is not one is named in ``problems``."""
    out = []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            last = n == len(lines) or (n == len(lines) - 1 and not lines[-1])
            problems.append(f"{what} line {n}: not valid JSON{' (still being written?)' if last else ''}; skipped")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{what} line {n}: not a JSON object; skipped")
            continue
        out.append(rec)
    return out


def _read_json(path: Path, what: str, problems: list[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        problems.append(f"{what}: not valid JSON ({e}); ignored")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{what}: not a JSON object; ignored")
        return {}
    return data


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory. It must hold config.yaml or metrics.jsonl; the rest is optional."""
    import yaml

    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    cfg_path, metrics_path = path / "config.yaml", path / "metrics.jsonl"
    if not cfg_path.is_file() and not metrics_path.is_file():
        raise FileNotFoundError(f"{path}: not a run directory (neither config.yaml nor metrics.jsonl is there)")
    run = Run(path)
    if metrics_path.is_file():
        run.records = read_jsonl(metrics_path, "metrics.jsonl", run.problems)
        bad = [i for i, r in enumerate(run.records) if not isinstance(r.get("step"), (int, float))]
        for i in reversed(bad):
            run.problems.append(f"metrics.jsonl record {i + 1}: no numeric 'step'; skipped")
            del run.records[i]
    else:
        run.missing.append("metrics.jsonl (no step logged yet)")
    if cfg_path.is_file():
        run.config_text = cfg_path.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError as e:
            run.problems.append(f"config.yaml: not valid YAML ({str(e).splitlines()[0]}); shown as text")
    else:
        run.missing.append("config.yaml")
    if (path / RUN_FILE).is_file():
        run.info = _read_json(path / RUN_FILE, RUN_FILE, run.problems)
    else:
        run.missing.append("run.json (status, device, precision, versions and wall time unknown)")
    if (path / "data_report.json").is_file():
        run.data_report = _read_json(path / "data_report.json", "data_report.json", run.problems)
    else:
        run.missing.append("data_report.json (no data report)")
    ev = path / EVAL_DIR
    if (ev / "eval_report.json").is_file():
        run.evaluation = _read_json(ev / "eval_report.json", f"{EVAL_DIR}/eval_report.json", run.problems)
    if (ev / "samples.jsonl").is_file():
        run.samples = read_jsonl(ev / "samples.jsonl", f"{EVAL_DIR}/samples.jsonl", run.problems)
    if (ev / "per_example.jsonl").is_file():
        run.per_example = read_jsonl(ev / "per_example.jsonl", f"{EVAL_DIR}/per_example.jsonl", run.problems)
    return run


def is_number(v: Any) -> bool:
    """A value a curve can show: int or float (finite or not), never a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finite(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)
