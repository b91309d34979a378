"""What every stage does before and after the loop: run directory, logging, model, data, export."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit import __version__
from dpokit.config import Config, ConfigError, save_config
from dpokit.data.formats import SkipReport
from dpokit.data.tokenize import TokenizeReport
from dpokit.losses import OPTION_KEYS
from dpokit.models import pick_device, resolve_precision
from dpokit.safety import RedactFilter, redact
from dpokit.train import checkpoint as ckpt
from dpokit.train.loop import append_metrics, seed_everything

__all__ = ["append_metrics"]

log = logging.getLogger("dpokit")


def setup_logging(run_dir: Path | None = None) -> None:
    logger = logging.getLogger("dpokit")
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(f, RedactFilter) for f in logger.filters):
        logger.addFilter(RedactFilter())
    if not any(getattr(h, "_dpokit", None) == "console" for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
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


@dataclass
class Stage:
    cfg: Config
    run_dir: Path
    device: torch.device
    precision: str
    resume_from: Path | None


def refuse_noop_split(cfg: Config) -> None:
    """data.split selects a split of a hub id or a DatasetDict folder; on plain files it would do nothing."""
    files = cfg.data.train_files + cfg.data.eval_files
    if cfg.data.split != "train" and files and all(Path(f).is_file() for f in files):
        raise ConfigError(f"data.split={cfg.data.split!r} has no effect: every data path is a plain file "
                          "(it selects a split of a hub dataset or a save_to_disk DatasetDict folder)")


def begin(cfg: Config, resume: str | None) -> Stage:
    refuse_noop_split(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.model.device)
    precision = resolve_precision(cfg.precision, device)
    resume_from = ckpt.find_resume(run_dir, resume)
    save_config(cfg, run_dir / "config.yaml")
    log.info("run directory %s; device %s; precision %s", run_dir, device, precision)
    return Stage(cfg, run_dir, device, precision, resume_from)


def record_skips(run_dir: Path, what: str, skipped: SkipReport | None) -> None:
    """Log and save what data.skip_bad_records skipped (nothing is skipped silently)."""
    if skipped is None:
        return
    if skipped.skipped:
        log.warning("%s data: skipped %d unusable records %s; first: %s", what, skipped.skipped, skipped.by_kind,
                    skipped.first[0])
    _update_report(run_dir, f"{what}_skipped_records", skipped.to_dict())


def _update_report(run_dir: Path, key: str, value: Any) -> None:
    reports = run_dir / "data_report.json"
    existing = json.loads(reports.read_text()) if reports.exists() else {}
    existing[key] = value
    reports.write_text(json.dumps(existing, indent=1))


def tokenize_all(
    examples: Sequence[Any], fn: Callable[..., Any], tokenizer: Any, cfg: Config, what: str, run_dir: Path,
) -> tuple[list[Any], TokenizeReport]:
    report = TokenizeReport()
    d = cfg.data
    out = [fn(tokenizer, ex, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
              prompt_truncation=d.prompt_truncation, report=report) for ex in examples]
    kept = [x for x in out if x is not None]
    log.info("%s data: %s", what, report.summary())
    _update_report(run_dir, what, report.to_dict())
    return kept, report


class AdaptersOff(torch.nn.Module):
    """The LoRA policy with its adapters switched off: the reference, without a second copy of the weights."""

    def __init__(self, policy: Any):
        super().__init__()
        self.policy = [policy]  # a list: not registered as a submodule (no parameters of its own)
        self.train(False)

    def train(self, mode: bool = True) -> AdaptersOff:
        self.training = False  # always counts as the frozen reference
        return self


def prepare_policy(cfg: Config, model: Any) -> Any:
    """LoRA adapters (model.lora_r), gradient checkpointing and torch.compile, as configured."""
    t, m = cfg.train, cfg.model
    if m.lora_r:
        from peft import LoraConfig, get_peft_model

        targets: Any = m.lora_target_modules
        targets = "all-linear" if targets == ["all-linear"] else targets
        model = get_peft_model(model, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA r=%d: %d trainable parameters", m.lora_r, trainable)
    if t.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if m.lora_r:
            model.enable_input_require_grads()
    if t.compile:
        model.get_decoder().compile()
    return model


def model_card(cfg: Config, stage: str, base: str, metrics: dict[str, float], extra: str = "") -> str:
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    data = ", ".join(cfg.data.train_files) or "(none)"
    return f"""---
library_name: transformers
tags: [dpokit, {stage}]
base_model: {base}
---
# {stage.upper()} model trained with dpokit {__version__}

- **Stage:** {stage}
- **Started from:** `{base}`
- **Reference:** `{cfg.model.ref_name_or_path or base}` {"(frozen copy of the start)" if not
    cfg.model.ref_name_or_path else ""}
- **Training data:** {data}
- **Loss:** `{cfg.loss.name}`, beta = {cfg.loss.beta}{_loss_options(cfg)}
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


def finish(stage: Stage, model: Any, tokenizer: Any, card: str) -> Path:
    out = ckpt.export_final(stage.run_dir / "final", model, tokenizer, redact(card))
    log.info("final model written to %s", out)
    return out
