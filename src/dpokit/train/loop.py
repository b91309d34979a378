"""The one training loop, shared by every stage (SFT, DPO, ...).

A stage hands the loop a ``Recipe``: how to collate examples, how many normalization units
(pairs, or completion tokens) a list of examples holds, and how to compute a micro-batch's
summed loss and metric sums. The loop owns everything with state: data order, gradient
accumulation, clipping, optimizer, schedule, metrics, checkpoints and resume.

Gradient accumulation is exact: the loss of every micro-batch is divided by the number of
units in the whole optimizer step (known before the first forward), and metrics are
accumulated as (sum, count) pairs, so 1 x 4 and 4 x 1 give the same update and the same logs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dpokit.config import Config
from dpokit.models import autocast
from dpokit.train import checkpoint as ckpt

log = logging.getLogger("dpokit")

Logs = dict[str, tuple[float, float]]  # metric name -> (sum, count)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: the current step finished, a checkpoint was written; carries how to resume."""

    def __init__(self, signum: int, step: int, total: int, checkpoint: Path):
        self.signum, self.step, self.total, self.checkpoint = signum, step, total, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}/{total}; checkpoint {checkpoint}")


class NonFiniteError(RuntimeError):
    pass


class _StopFlag:
    """Installs SIGINT/SIGTERM handlers that only set a flag; the loop stops at the end of the step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing the current step, then writing a checkpoint",
                    signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class Recipe:
    name: str
    collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
    units: Callable[[Sequence[Any]], int]
    # (model, batch on device, units in the whole step) -> (loss to backpropagate, metric sums)
    compute: Callable[[torch.nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, Logs]]
    throughput_name: str = "pairs_per_s"
    postfix: tuple[str, ...] = ("loss",)


class StepOrder:
    """Which examples make step s: a fresh seeded permutation per epoch, so any step is reproducible."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise ValueError("no training examples left after tokenization")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = math.ceil(n / batch_size)
        self._perm: tuple[int, torch.Tensor] | None = None

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1][k * self.batch_size : (k + 1) * self.batch_size].tolist()


def total_steps(cfg: Config, order: StepOrder) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil((cfg.train.epochs or 1.0) * order.steps_per_epoch))


def lr_lambda(total: int, warmup_ratio: float, kind: str) -> Callable[[int], float]:
    warmup = int(round(total * warmup_ratio))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return f


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _add(acc: Logs, logs: Logs) -> None:
    for k, (s, c) in logs.items():
        s0, c0 = acc.get(k, (0.0, 0.0))
        acc[k] = (s0 + float(s), c0 + float(c))


def _means(acc: Logs) -> dict[str, float]:
    return {k: s / c for k, (s, c) in acc.items() if c}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class LoopResult:
    steps: int
    last_metrics: dict[str, float]
    history: list[dict[str, Any]]


def train(
    cfg: Config, model: torch.nn.Module, recipe: Recipe, items: Sequence[Any], run_dir: Path,
    device: torch.device, precision: str, lr: float, resume_from: Path | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Run optimizer steps over ``items`` until max_steps/epochs; returns the logged history."""
    t = cfg.train
    order = StepOrder(len(items), t.batch_size, t.seed)
    steps = total_steps(cfg, order)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, t.warmup_ratio, t.scheduler))
    metrics_path = run_dir / "metrics.jsonl"
    start = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        start = int(state["step"])
        _truncate_metrics(metrics_path, start)
        log.info("resumed from %s at step %d", resume_from, start)
    elif metrics_path.exists():
        metrics_path.unlink()

    micro = t.batch_size // t.grad_accum
    history: list[dict[str, Any]] = []
    acc: Logs = {}
    tokens = examples = 0
    nonfinite = 0
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=recipe.name, dynamic_ncols=True, disable=None, file=sys.stderr)
    model.train()
    last: dict[str, float] = {}
    ckpt_root = run_dir / "checkpoints"
    ckpt.remove_stale_temporaries(ckpt_root)

    def save(step: int) -> Path:
        return ckpt.save_checkpoint(ckpt_root, step, model, optimizer, scheduler,
                                    {"epoch": step / order.steps_per_epoch, "nonfinite_skipped": nonfinite},
                                    t.keep_last)

    with _StopFlag() as stop:
        for step in range(start, steps):
            step_items = [items[i] for i in order.indices(step)]
            chunks = [step_items[i : i + micro] for i in range(0, len(step_items), micro)]
            denom = sum(recipe.units(c) for c in chunks)
            step_logs: Logs = {}
            finite = True
            for chunk in chunks:
                batch = to_device(recipe.collate(chunk), device)
                with autocast(device, precision):
                    loss, logs = recipe.compute(model, batch, denom)
                finite = finite and bool(torch.isfinite(loss.detach()))
                loss.backward()
                _add(step_logs, logs)
                tokens += int(batch["attention_mask"].sum())
                examples += len(chunk)
            clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            current_lr = scheduler.get_last_lr()[0]
            if finite and math.isfinite(grad_norm):
                _add(acc, step_logs)
                _add(acc, {"grad_norm": (grad_norm, 1)})
                optimizer.step()
            else:  # skip the update, keep the schedule and the data position: counted, never silent
                nonfinite += 1
                log.warning("step %d: non-finite %s; update skipped (%d of at most %d)", step + 1,
                            "loss" if not finite else f"gradient norm ({grad_norm})", nonfinite, t.max_nonfinite)
                if nonfinite > t.max_nonfinite:
                    good = ckpt.list_checkpoints(ckpt_root)
                    raise NonFiniteError(
                        f"{nonfinite} updates had a NaN/inf loss or gradient (train.max_nonfinite={t.max_nonfinite}); "
                        f"stopped at step {step + 1}. Last good checkpoint: {good[-1] if good else 'none'} "
                        "(weights there are from finite updates only). Lower train.lr or check the data.")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            if done % t.log_steps == 0 or done == steps:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                record = {"step": done, "epoch": round(done / order.steps_per_epoch, 4), **_means(acc),
                          "lr": current_lr, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                          recipe.throughput_name: examples / elapsed}
                if nonfinite:
                    record["nonfinite_skipped"] = nonfinite
                if on_log is not None:
                    on_log(record)  # may annotate the record before it is written
                history.append(record)
                append_metrics(run_dir, record)
                last = record
                shown = [k for k in (*recipe.postfix, recipe.throughput_name) if k in record]
                bar.set_postfix({k.split("/")[-1][:6]: f"{record[k]:.4g}" for k in shown})
                if bar.disable:
                    log.info("step %d/%d %s", done, steps, " ".join(f"{k}={record[k]:.4g}" for k in shown))
                acc, tokens, examples, t0 = {}, 0, 0, time.perf_counter()
            bar.update(1)
            if stop.signum is not None and done < steps:
                bar.close()
                raise TrainingInterrupted(stop.signum, done, steps, save(done))
            if t.save_steps and done % t.save_steps == 0 and done < steps:
                save(done)
    bar.close()
    if steps > start:
        save(steps)
    return LoopResult(steps=steps, last_metrics=last, history=history)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop logged lines past the resumed step so the log reads as one run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
