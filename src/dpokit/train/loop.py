"""The one training loop, shared by every stage (SFT, DPO and its family).

A stage builds a ``Job``: the policy (the ``LogProbs`` module, possibly wrapped), a ``Recipe`` (what one
micro-batch computes), the tokenized examples and the ``StepOrder`` that says which of them form each
micro-batch. ``fit`` owns everything with state: optimizer, schedule, gradient accumulation, clipping,
metrics, checkpoints, resume and signals; ``finish`` evaluates and exports.

Gradient accumulation is exact: the loss of every micro-batch is divided by the number of units in the
whole optimizer step (known before the first forward), and metrics are accumulated as (sum, count)
pairs, so 1 x 4 and 4 x 1 give the same update and the same logs. Metric sums stay tensors on the device
until a line is logged (one transfer per logged line, not one per micro-batch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit import distributed
from dpokit.config import Config
from dpokit.distributed import ONE, Dist, all_reduce, on_main
from dpokit.logprobs import unwrap
from dpokit.models import autocast
from dpokit.progress import Progress
from dpokit.resolved import card_facts
from dpokit.train import checkpoint as ckpt
from dpokit.train import resume
from dpokit.train.recipes import Logs, Recipe
from dpokit.train.rundir import (
    RunLog,
    Session,
    discard_unstarted,
    export,
    model_card,
    release_run_dir,
    truncate_metrics,
)

log = logging.getLogger("dpokit")


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


# ----------------------------------------------------------------------------------- data order
class StepOrder:
    """Which examples form micro-batch m of step s on rank r, and which forwards compute it: the one place
    that decides it.

    Every epoch is a fresh seeded permutation of the n examples; step s of an epoch takes the next
    ``batch_size`` of them (the global batch; the last step of an epoch may hold fewer). Rank r of
    ``world`` takes ``step[r::world]`` and splits it into ``grad_accum`` micro-batches of at most
    ceil(batch_size / (world * grad_accum)) examples, in order. Micro-batches may be empty (a ragged last
    step); ``micro_batches`` always returns ``grad_accum`` of them.

    ``forwards`` splits each micro-batch into consecutive forwards of at most ``budget`` positions (the
    sum of ``costs``, each example's distinct tokens; an example over the budget is a forward alone):
    the gradient is the same (every forward's loss is divided by the whole step's units), the activation
    memory is one forward's, and short forwards waste no padding. Every rank gets the same number of
    forwards (a rank with fewer gets empty ones, run as zero-weight dummies), so FSDP2's collectives pair
    up. The loop, the reference cache and evaluation all use this.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int, rank: int = 0, world: int = 1,
                 costs: Sequence[int] | None = None, budget: int = 0):
        if n == 0:
            raise ValueError("no training examples left after tokenization")
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self.rank, self.world = rank, world
        self.costs, self.budget = costs, budget
        self.steps_per_epoch = math.ceil(n / batch_size)
        self.micro_size = math.ceil(batch_size / (world * grad_accum))
        self._perm: tuple[int, torch.Tensor] | None = None
        self._ranks: dict[int, StepOrder] = {rank: self}

    def indices(self, step: int) -> list[int]:
        """The global batch of ``step``: dataset positions, in order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1][k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's ``grad_accum`` micro-batches of ``step`` (dataset positions; some may be empty)."""
        local = self.indices(step)[self.rank :: self.world]
        m = self.micro_size
        return [local[k * m : (k + 1) * m] for k in range(self.grad_accum)]

    def forwards(self, step: int) -> list[list[int]]:
        """This rank's forwards of ``step``, micro-batch by micro-batch (empty ones where another rank has more);
        a micro-batch no rank has examples for gets none."""
        per_rank = [self.for_rank(r).micro_batches(step) for r in range(self.world)]
        mine: list[list[int]] = []
        for m in range(self.grad_accum):
            groups = [split_by_cost(mb[m], self.costs, self.budget) for mb in per_rank]
            most = max(len(g) for g in groups)
            mine += groups[self.rank] + [[] for _ in range(most - len(groups[self.rank]))]
        return mine

    def for_rank(self, rank: int) -> StepOrder:
        """The same order as seen by another rank."""
        if rank not in self._ranks:
            self._ranks[rank] = StepOrder(self.n, self.batch_size, self.grad_accum, self.seed, rank, self.world,
                                          self.costs, self.budget)
        return self._ranks[rank]

    def first_epoch(self, steps: int) -> list[list[int]]:
        """Every non-empty forward of this rank over the first min(steps, steps_per_epoch) steps."""
        return [f for s in range(min(steps, self.steps_per_epoch)) for f in self.forwards(s) if f]


def split_by_cost(idx: list[int], costs: Sequence[int] | None, budget: int) -> list[list[int]]:
    """``idx`` in consecutive groups whose summed ``costs`` stay within ``budget`` (one example over it is a group
    alone); ``budget`` 0 or no costs: one group. An empty ``idx`` has no groups."""
    if not idx:
        return []
    if not budget or costs is None:
        return [list(idx)]
    groups: list[list[int]] = [[]]
    total = 0
    for i in idx:
        if groups[-1] and total + costs[i] > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += costs[i]
    return groups


def eval_micro_batches(n: int, batch_size: int, rank: int = 0, world: int = 1, costs: Sequence[int] | None = None,
                       budget: int = 0) -> list[list[int]]:
    """Held-out examples in file order, ``batch_size`` per micro-batch, micro-batch j on rank j % world, each split
    into forwards of at most ``budget`` positions as in training (``split_by_cost``)."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)][rank::world]
    return [g for b in batches for g in split_by_cost(b, costs, budget)]


CPU_FORWARD_TOKENS = 512  # measured: benchmarks/bench_dpo.py --set train.forward_tokens=N (README, Performance)


def forward_budget(cfg: Config, device: torch.device, splittable: bool = True) -> int:
    """Positions per forward: ``train.forward_tokens``, or by default ``CPU_FORWARD_TOKENS`` on a CPU and no limit
    elsewhere (not measured on accelerators here); 0 (never split) for recipes whose loss couples the examples of a
    micro-batch (KTO's batch KL baseline)."""
    if not splittable:
        return 0
    chosen = cfg.train.forward_tokens
    if chosen is None:
        return CPU_FORWARD_TOKENS if device.type == "cpu" else 0
    return chosen


def step_order(cfg: Config, n: int, place: Dist = ONE, costs: Sequence[int] | None = None, budget: int = 0
               ) -> StepOrder:
    t = cfg.train
    return StepOrder(n, t.batch_size, t.grad_accum, t.seed, place.rank, place.world, costs, budget)


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


# -------------------------------------------------------------------------------------- metrics
class Metrics:
    """(sum, count) per metric as float64 tensors; turned into Python numbers once per logged line."""

    def __init__(self) -> None:
        self.acc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, logs: Logs | Metrics) -> None:
        items = logs.acc.items() if isinstance(logs, Metrics) else logs.items()
        for k, (s, c) in items:
            s = s.detach().double() if isinstance(s, torch.Tensor) else torch.tensor(float(s), dtype=torch.float64)
            c = c.double() if isinstance(c, torch.Tensor) else torch.tensor(float(c), dtype=torch.float64)
            if k in self.acc:
                s0, c0 = self.acc[k]
                s, c = s0 + s.to(s0.device), c0 + c.to(c0.device)
            self.acc[k] = (s, c.to(s.device))

    def reduced(self, keys: tuple[str, ...], place: Dist, device: torch.device) -> Metrics:
        """Summed over ranks, over the fixed ``keys`` (a key a rank lacks counts as (0, 0) there)."""
        if not place.active:
            return self
        zero = torch.zeros((), dtype=torch.float64, device=device)
        packed = torch.stack([torch.stack([self.acc[k][0].to(device), self.acc[k][1].to(device)])
                              if k in self.acc else torch.stack([zero, zero]) for k in keys])
        all_reduce(packed, place)
        out = Metrics()
        out.acc = {k: (packed[i, 0], packed[i, 1]) for i, k in enumerate(keys)}
        return out

    def means(self) -> dict[str, float]:
        if not self.acc:
            return {}
        keys = list(self.acc)
        sums = torch.stack([self.acc[k][0] for k in keys]).tolist()
        counts = torch.stack([self.acc[k][1] for k in keys]).tolist()
        return {k: s / c for k, s, c in zip(keys, sums, counts) if c}


# ------------------------------------------------------------------------------------------ job
@dataclass
class Job:
    """A built stage: everything ``fit`` and ``finish`` need."""

    session: Session
    policy: torch.nn.Module  # the LogProbs module, possibly wrapped (DDP, FSDP2, torch.compile)
    recipe: Recipe
    items: list[Any]
    order: StepOrder
    lr: float
    tokenizer: Any
    eval_recipe: Recipe | None = None
    eval_items: list[Any] = field(default_factory=list)
    eval_costs: list[int] | None = None  # each held-out example's positions, to split its forwards as training's
    observers: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)  # see (and may annotate)
    # every metrics record before it is written
    log: RunLog | None = None  # opened by fit, closed by finish (or when the run fails or is interrupted)


@dataclass
class LoopResult:
    steps: int
    last_metrics: dict[str, float]
    history: list[dict[str, Any]]


def to_device(batch: Any, device: torch.device) -> Any:
    return batch.to(device)


def fit(job: Job) -> LoopResult:
    """Run optimizer steps until max_steps/epochs; returns the logged history. The run's RunLog (metrics,
    run.json, report, trackers) is opened here and marked interrupted or failed if training stops early."""
    try:
        return _fit(job)
    except TrainingInterrupted:
        if job.log is not None:
            job.log.close("interrupted")
        raise
    except BaseException as e:
        if job.log is not None:
            job.log.close("failed", f"{type(e).__name__}: {e}")
        raise


def _fit(job: Job) -> LoopResult:
    """Run optimizer steps until max_steps/epochs; returns the logged history.

    Under a process group every rank runs this with the same global batch split over ranks; the loss of a
    micro-batch is divided by the step's global units over the world size, so the engines' gradient averaging
    gives the one-process gradient; metrics, the non-finite decision and a stop signal are reduced over ranks, so
    every rank logs, skips, checkpoints and stops at the same step; only rank 0 writes the run directory.
    """
    s, cfg, recipe, items, order = job.session, job.session.cfg, job.recipe, job.items, job.order
    t, device, precision, run_dir, place = cfg.train, s.device, s.precision, s.run_dir, s.dist
    steps = total_steps(cfg, order)
    model = unwrap(job.policy)
    distributed.reshard(job.policy, place)  # after the no-grad forwards that filled the reference cache
    params = [p for p in job.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=job.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay,
        fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, t.warmup_ratio, t.scheduler))
    metrics_path = run_dir / "metrics.jsonl"
    start = num_tokens = 0  # num_tokens: every sequence token trained on since step 0 (TRL's num_tokens)
    deps = resume.depends_on(cfg, items)  # recorded in every checkpoint, checked on resume
    if s.resume_from is not None:
        saved = json.loads((s.resume_from / ckpt.STATE_FILE).read_text())
        rebuild = resume.check_resume(saved.get("depends_on"), deps, int(saved["step"]), steps, s.extend)
        state = ckpt.load_checkpoint(s.resume_from, model, optimizer, scheduler, place)
        start, num_tokens = int(state["step"]), int(state.get("num_tokens", 0))
        if rebuild:  # --extend: the schedule of the new length, from the resumed step on
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_lambda(steps, t.warmup_ratio, t.scheduler), last_epoch=start - 1)
        if place.main:
            truncate_metrics(metrics_path, start)
        log.info("resumed from %s at step %d", s.resume_from, start)
    elif place.main and metrics_path.exists():
        metrics_path.unlink()
    job.log = RunLog(s, steps, start)

    history: list[dict[str, Any]] = []
    window = Metrics()
    tokens = examples = 0
    nonfinite = applied = 0
    t0 = time.perf_counter()
    job.policy.train()
    last: dict[str, float] = {}
    ckpt_root = run_dir / "checkpoints"
    if place.main:
        ckpt.remove_stale_temporaries(ckpt_root)
    dummy = (items[:1], [0])  # what a rank computes, with weight 0, where it has no examples

    def save(step: int) -> Path:
        return ckpt.save_checkpoint(ckpt_root, step, model, optimizer, scheduler,
                                    {"epoch": step / order.steps_per_epoch, "nonfinite_skipped": nonfinite,
                                     "world_size": place.world, "engine": place.engine, "num_tokens": num_tokens,
                                     "depends_on": deps},
                                    t.keep_last, place)

    with _StopFlag() as stop, Progress(recipe.name, total=steps, unit="step", initial=start, every=None,
                                       enabled=place.main) as bar:
        for step in range(start, steps):
            forwards = order.forwards(step)
            denom = recipe.units([items[i] for i in order.indices(step)]) / place.world
            step_metrics = Metrics()
            step_tokens = step_examples = 0
            finite = torch.ones((), dtype=torch.bool, device=device)
            for k, idx in enumerate(forwards):
                chunk, index = ([items[i] for i in idx], idx) if idx else dummy
                batch = to_device(recipe.collate(chunk, index), device)
                with distributed.no_sync(job.policy, place, last=k == len(forwards) - 1), \
                        autocast(device, precision):
                    loss, logs = recipe.compute(job.policy, batch, denom)
                    if not idx:
                        loss = loss * 0.0
                    finite &= torch.isfinite(loss.detach())
                    loss.backward()
                if idx:
                    step_metrics.add(logs)
                    step_tokens += batch.tokens
                    step_examples += len(chunk)
            clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            grad_norm = distributed.clip_grad_norm(params, clip, place)
            current_lr = scheduler.get_last_lr()[0]
            # one reduction a step decides for every rank: a non-finite loss anywhere, a stop signal anywhere, and
            # the step's tokens and examples over the world
            flags = torch.tensor([0.0 if bool(finite) else 1.0, 1.0 if stop.signum else 0.0, step_tokens,
                                  step_examples], dtype=torch.float64, device=device)
            flags = all_reduce(flags, place)
            finite_step, norm = not bool(flags[0]), float(grad_norm)
            signum = (stop.signum or signal.SIGTERM) if flags[1] else 0
            tokens, examples = tokens + int(flags[2]), examples + int(flags[3])
            num_tokens += int(flags[2])
            step_metrics = step_metrics.reduced(recipe.keys, place, device)
            if finite_step and math.isfinite(norm):
                window.add(step_metrics)
                window.add({"grad_norm": (grad_norm, 1)})
                optimizer.step()
                applied += 1
                if not distributed.all_finite(params, place):  # an update that overflowed: nothing after it is kept
                    good = on_main(lambda: ckpt.list_checkpoints(ckpt_root), place)
                    raise NonFiniteError(
                        f"the weights became NaN/inf at step {step + 1} (finite gradients, an update that "
                        f"overflowed: lower train.lr); nothing from this step on was saved. Last good checkpoint: "
                        f"{good[-1] if good else 'none'}.")
            else:  # skip the update, keep the schedule and the data position: counted, never silent
                nonfinite += 1
                log.warning("step %d: non-finite %s; update skipped (%d of at most %d)", step + 1,
                            "loss" if not finite_step else f"gradient norm ({norm})", nonfinite, t.max_nonfinite)
                if nonfinite > t.max_nonfinite:
                    good = on_main(lambda: ckpt.list_checkpoints(ckpt_root), place)
                    raise NonFiniteError(
                        f"{nonfinite} updates had a NaN/inf loss or gradient (train.max_nonfinite={t.max_nonfinite}); "
                        f"stopped at step {step + 1}. Last good checkpoint: {good[-1] if good else 'none'} "
                        "(weights there are from finite updates only). Lower train.lr or check the data.")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            shown = ""
            if done % t.log_steps == 0 or done == steps:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                record = {"step": done, "epoch": round(done / order.steps_per_epoch, 4), **window.means(),
                          "lr": current_lr, "learning_rate": current_lr, "tokens": tokens, "num_tokens": num_tokens,
                          "tokens_per_s": tokens / elapsed, recipe.throughput_name: examples / elapsed}
                if nonfinite:
                    record["nonfinite_skipped"] = nonfinite
                if place.main:
                    for observe in job.observers:
                        observe(record)  # may annotate the record before it is written
                job.log.record(record)
                history.append(record)
                last = record
                keys = [k for k in (*recipe.postfix, recipe.throughput_name) if k in record]
                shown = " ".join(f"{k.split('/')[-1][:6]}={record[k]:.4g}" for k in keys)
                if not bar.interactive:
                    log.info("step %d/%d %s", done, steps, shown)
                window, tokens, examples, t0 = Metrics(), 0, 0, time.perf_counter()
            bar.update(1, shown)
            if signum and done < steps:
                raise TrainingInterrupted(signum, done, steps, save(done))
            if t.save_steps and (done % t.save_steps == 0 or done == steps):
                save(done)  # checkpoints when asked (train.save_steps), and the last step with them
            if t.snapshot_steps and done % t.snapshot_steps == 0 and done < steps:  # weights alone, kept
                ckpt.save_snapshot(run_dir / "snapshots" / f"step-{done}", model, job.tokenizer, done, place)
    if steps > start and applied == 0:
        raise NonFiniteError(f"no update was applied: all {steps - start} steps had a NaN/inf loss or gradient; "
                             "nothing was saved. Check the data and lower train.lr.")
    return LoopResult(steps=steps, last_metrics=last, history=history)


@torch.no_grad()
def evaluate(job: Job) -> dict[str, float]:
    """Mean loss and metrics over the held-out examples, under ``eval/`` names (every rank its share)."""
    s, recipe, items, place = job.session, job.eval_recipe, job.eval_items, job.session.dist
    assert recipe is not None
    job.policy.eval()
    acc = Metrics()
    per_rank = [eval_micro_batches(len(items), s.cfg.train.batch_size, r, place.world, job.eval_costs,
                                   job.order.budget) for r in range(place.world)]
    mine = per_rank[place.rank]
    for k in range(max(len(b) for b in per_rank)):  # every rank runs the same forwards
        idx = mine[k] if k < len(mine) else [0]
        chunk = [items[i] for i in idx]
        with autocast(s.device, s.precision):
            _, logs = recipe.compute(job.policy, to_device(recipe.collate(chunk, idx), s.device), len(chunk))
        if k < len(mine):
            acc.add(logs)
    distributed.reshard(job.policy, place)
    job.policy.train()
    return {f"eval/{k}": v for k, v in acc.reduced(recipe.keys, place, s.device).means().items()}


def finish(job: Job, result: LoopResult, export_model: bool = True) -> Path:
    """Evaluate on the held-out data (if any), then write ``final/`` with its model card; returns it."""
    run_log = job.log or RunLog(job.session, result.steps, result.steps)
    try:
        metrics = dict(result.last_metrics)
        if job.eval_items:
            ev = evaluate(job)
            run_log.record({"step": result.steps, **ev})
            log.info("eval: %s", " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
            metrics.update(ev)
        if not export_model:
            return job.session.run_dir
        card = model_card(job.session.cfg, job.session.stage, metrics,
                          card_facts(job.session.device, getattr(job.recipe, "layouts_used", {})))
        out = export(job.session, unwrap(job.policy), job.tokenizer, card)
    except BaseException as e:
        run_log.close("failed", f"{type(e).__name__}: {e}")
        raise
    run_log.close("finished")
    return out


def run(job: Job) -> Path:
    """fit, then finish: the whole stage."""
    return finish(job, fit(job))


def run_stage(build: Callable[..., Job], cfg: Config, resume: str | None = None, overwrite: bool = False,
              extend: bool = False, then: Callable[[Job, LoopResult, Path], None] | None = None) -> Path:
    """Build a stage's Job and run it; a run that fails before its first step leaves no directory it made.
    ``then(job, result, final)`` runs after the export (a stage's own model card)."""
    try:
        try:
            job = build(cfg, resume, overwrite=overwrite, extend=extend)
        except BaseException:
            if int(os.environ.get("RANK", "0")) == 0:
                discard_unstarted(Path(cfg.output_dir))
            raise
        result = fit(job)
        final = finish(job, result)
        if then is not None:
            then(job, result, final)
        return final
    finally:
        release_run_dir(Path(cfg.output_dir))

