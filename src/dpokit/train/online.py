"""``dpokit online``: online and iterative DPO, in rounds.

Round k = 1..R:

1. take the round's prompts (``prompts_per_round`` of them, a seeded permutation of the prompt file per pass:
   ``StepOrder``, as the loop orders its examples);
2. sample n completions per prompt from the policy the round starts from (``start``: ``previous``, the policy
   after round k-1, or ``initial``), at the round's seed;
3. judge them: a reward judge scores every sample (the judge budget counts samples scored), a pairwise judge
   labels candidate pairs directly (the budget counts comparisons);
4. make pairs (``dpokit.eval.pairing``: best-worst, all-pairs, random, rso, bt);
5. before training on them, measure the implicit reward of the policy that left round k-1 against its own
   reference on the fresh pairs: beta (log pi/pi_ref)(y_w) > beta (log pi/pi_ref)(y_l) (accuracy and margin);
6. train DPO (any loss of the registry) on the round's pairs: an ordinary ``dpokit dpo`` run under
   ``RUN/rounds/round-k/dpo`` (``build_dpo`` and the one loop), against the reference of ``reference``:
   ``initial`` (the starting model) or ``previous`` (the policy after round k-1); its own AdamW and schedule;
7. evaluate on held-out prompts: the eval judge's mean reward of the policy's samples, KL(policy || initial)
   estimated from them, and the win rate against the initial model's samples (same prompts and seed).

Round 0 evaluates the initial model. Each round writes ``RUN/rounds/round-k/``: ``samples.jsonl`` (with the
judge's rewards), ``pairs.jsonl``, ``dpo/`` (config, metrics, ``final/``), ``eval_samples.jsonl`` and
``round.json`` (its metrics; written last, atomically: the round is complete when it exists).
``RUN/metrics.jsonl`` (one line per round, ``step`` = round), ``RUN/summary.md``, ``RUN/run.json`` and
``RUN/report.html`` are rewritten after every round.

Resume is at round granularity: a stopped run restarts at the first round without ``round.json`` (whatever
that round had written is removed first) and recomputes it exactly: every random draw of round k comes from
seeds fixed by (train.seed, k), and every model a round needs is read back from disk, in the uninterrupted
run too. A DPO run interrupted inside a round is redone from the round's start, not from its checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.config import Config, ConfigError, to_dict
from dpokit.data.formats import Text
from dpokit.eval.evaluate import judge_pairs, policy_kl, preference_eval, read_prompts
from dpokit.eval.pairing import (
    MODES,
    PairingResult,
    check_pairwise_mode,
    make_pairing,
    pair_judged,
    pair_scored,
    prompt_text,
)
from dpokit.eval.sampling import Sample, sample
from dpokit.eval.stats import mean_stderr, win_rate
from dpokit.losses import resolve_loss
from dpokit.models import freeze, load_model, load_tokenizer, pick_device, resolve_precision
from dpokit.train.loop import StepOrder
from dpokit.train.rundir import claim_run_dir, release_run_dir, setup_logging

log = logging.getLogger("dpokit")

SETTINGS_FILE = "online.json"
ROUND_FILE = "round.json"


@dataclass(frozen=True)
class OnlineSettings:
    """What ``dpokit online`` adds to a DPO config (each round's DPO run takes the config's loss and train keys)."""

    prompts: str
    eval_prompts: str | None = None
    rounds: int = 3
    prompts_per_round: int = 64
    n: int = 4
    mode: str = "best-worst"
    pairs_per_prompt: int = 1
    rso_beta: float = 0.5
    rso_samples: int = 2
    bt_tau: float = 1.0
    reference: str = "initial"
    start: str = "previous"
    max_new_tokens: int = 64
    temperature: float = 1.0
    eval_samples: int = 4
    chat: bool | None = None
    judge: dict[str, Any] = field(default_factory=dict)  # how the judge was given (to rebuild it on resume)
    eval_judge: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        for key, low in (("rounds", 1), ("prompts_per_round", 1), ("n", 2), ("max_new_tokens", 1),
                         ("eval_samples", 1), ("pairs_per_prompt", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"{key.replace('_', '-')} must be >= {low}, got {getattr(self, key)}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "rso" and not 2 <= self.rso_samples <= self.n:
            raise ConfigError(f"--rso-samples must be in [2, n={self.n}], got {self.rso_samples}")
        if self.reference not in ("initial", "previous") or self.start not in ("initial", "previous"):
            raise ConfigError(f"--reference and --start are 'initial' or 'previous', got {self.reference!r} and "
                              f"{self.start!r}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0 (on-policy pairs sample), got {self.temperature}")
        try:
            self.pairing()
        except ValueError as e:
            raise ConfigError(f"--mode {self.mode}: {e}") from None

    def pairing(self) -> Any:
        return make_pairing(self.mode, pairs_per_prompt=self.pairs_per_prompt, rso_beta=self.rso_beta,
                            rso_samples=self.rso_samples, bt_tau=self.bt_tau)


def check_online_config(cfg: Config) -> None:
    if cfg.data.train_files or cfg.data.eval_files:
        raise ConfigError("data.train_files/data.eval_files have no effect on `dpokit online`: each round's pairs "
                          "are sampled from --prompts; held-out prompts are --eval-prompts")
    import os

    if cfg.train.distributed != "auto" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("`dpokit online` runs in one process (its rounds sample and judge between DPO runs); "
                          "leave train.distributed at auto")


def round_seed(seed: int, k: int, what: str) -> int:
    """The seed of one random draw of round k (sampling, pairing, DPO), fixed by (train.seed, k, what)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}-{k}-{what}".encode()).digest()[:4], "big") >> 1


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    tmp.replace(path)


def _finite(x: float) -> float | None:
    """None for NaN (a win rate with no decided comparison): run records stay strict JSON."""
    return None if x != x else x


def _is_pairwise(judge: Any) -> bool:
    return not hasattr(judge, "score") and hasattr(judge, "compare")


@dataclass
class Online:
    """One online run: its settings, config, judges and the models every round shares."""

    cfg: Config
    settings: OnlineSettings
    judge: Any
    eval_judge: Any
    run_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    tokenizer: Any = None
    prompts: list[Text] = field(default_factory=list)
    eval_prompts: list[Text] = field(default_factory=list)
    initial: Any = None  # the starting model, frozen (KL and the reference of round 1)
    _models: dict[str, Any] = field(default_factory=dict)

    # -------------------------------------------------------------------------------------------- models
    @property
    def initial_path(self) -> str:
        return self.cfg.model.name_or_path

    def model(self, path: str) -> Any:
        """A model read from disk (kept while rounds need it): every round reads its models alike."""
        if path == self.initial_path:
            return self.initial
        if path not in self._models:
            self._models[path] = freeze(load_model(path, self.cfg.model.trust_remote_code)).to(self.device)
        return self._models[path]

    def forget(self, keep: Sequence[str] = ()) -> None:
        for path in [p for p in self._models if p not in keep]:
            del self._models[path]

    def rounds_dir(self) -> Path:
        return self.run_dir / "rounds"

    def round_dir(self, k: int) -> Path:
        return self.rounds_dir() / f"round-{k:03d}"

    def record(self, k: int) -> dict[str, Any] | None:
        path = self.round_dir(k) / ROUND_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def abs_path(self, stored: str) -> str:
        """A model path as round.json stores it: relative to the run directory, or the initial model as given."""
        return stored if stored == self.initial_path else str(self.run_dir / stored)

    # ------------------------------------------------------------------------------------------- a round
    def round_prompts(self, k: int) -> list[int]:
        order = StepOrder(len(self.prompts), min(self.settings.prompts_per_round, len(self.prompts)), 1,
                          self.cfg.train.seed)
        return order.indices(k - 1)

    def judge_samples(self, samples: Sequence[Sample], prompts: Sequence[Text], judge: Any) -> list[float]:
        return judge.score([prompt_text(prompts[s.prompt_index]) for s in samples], [s.text for s in samples])

    def evaluate(self, k: int, policy: Any, out: Path) -> dict[str, Any]:
        """Held-out: the eval judge's reward of the policy's samples, KL to the initial model, win rate against the
        initial model's samples (round 0's)."""
        s = self.settings
        if not self.eval_prompts:
            return {}
        samples = sample(policy, self.tokenizer, self.eval_prompts, n=s.eval_samples,
                         max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         seed=round_seed(self.cfg.train.seed, 0, "eval"), device=self.device,
                         precision=self.precision, what=f"round {k}: sampling held-out prompts")
        texts = [prompt_text(p) for p in self.eval_prompts]
        rows: list[dict[str, Any]] = [{"prompt_index": x.prompt_index, "prompt": texts[x.prompt_index],
                                       "text": x.text, "completion_ids": x.completion_ids} for x in samples]
        metrics: dict[str, Any] = {}
        pairwise = _is_pairwise(self.eval_judge)
        if not pairwise:
            rewards = self.judge_samples(samples, self.eval_prompts, self.eval_judge)
            for row, r in zip(rows, rewards):
                row["reward"] = r
            metrics["eval/reward"], metrics["eval/reward_stderr"] = mean_stderr(rewards)
        if k > 0:
            kl = policy_kl(policy, self.initial, samples, self.tokenizer.pad_token_id, self.device, self.precision)
            metrics["eval/kl"], metrics["eval/kl_stderr"] = kl.sequence, kl.sequence_stderr
            base = [json.loads(ln) for ln in (self.round_dir(0) / "eval_samples.jsonl").read_text().splitlines()]
            if pairwise:
                items = [(r["prompt"], r["text"], b["text"]) for r, b in zip(rows, base)]
                outcomes = judge_pairs(self.eval_judge, items, max_invalid=self.judge_max_invalid(),
                                       log_path=out / "eval_judgements.jsonl")
            else:
                outcomes = [1.0 if r["reward"] > b["reward"] else 0.0 if r["reward"] < b["reward"] else 0.5
                            for r, b in zip(rows, base)]
            wr = win_rate(outcomes)
            metrics["eval/win_rate"], metrics["eval/win_rate_ties_half"] = _finite(wr.rate), _finite(wr.rate_ties_half)
            metrics["eval/ties"] = wr.ties
        else:
            metrics["eval/kl"], metrics["eval/kl_stderr"] = 0.0, 0.0
        _write_jsonl(out / "eval_samples.jsonl", rows)
        metrics["eval/samples"] = len(samples)
        return metrics

    def judge_max_invalid(self) -> float:
        return float(self.settings.judge.get("judge_max_invalid", 0.1))

    def pair(self, k: int, samples: Sequence[Sample], prompts: Sequence[Text], out: Path
             ) -> tuple[PairingResult, dict[str, Any]]:
        """The round's pairs; the judge's rewards of the samples (reward judge) or its comparisons (pairwise)."""
        s, seed = self.settings, self.cfg.train.seed
        texts = [prompt_text(p) for p in prompts]
        rows = [{"prompt_index": x.prompt_index, "prompt": texts[x.prompt_index], "text": x.text,
                 "completion_ids": x.completion_ids} for x in samples]
        if _is_pairwise(self.judge):
            _write_jsonl(out / "samples.jsonl", rows)  # before judging: a judge that fails keeps them
            result = pair_judged(samples, prompts, self.judge, check_pairwise_mode(s.mode, s.n),
                                 max_invalid=self.judge_max_invalid(), log_path=out / "judgements.jsonl")
            return result, {"judge_calls": result.comparisons}
        rewards = self.judge_samples(samples, prompts, self.judge)
        for row, r in zip(rows, rewards):
            row["reward"] = r
        _write_jsonl(out / "samples.jsonl", rows)
        result = pair_scored(samples, rewards, prompts, s.pairing(), seed=seed, salt=f"round-{k}")
        m, se = mean_stderr(rewards)
        return result, {"judge_calls": len(samples), "sample_reward": m, "sample_reward_stderr": se}

    def implicit_before(self, k: int, pairs_file: Path, pairs: int) -> dict[str, Any]:
        """The policy after round k-1 against its own reference, on round k's fresh pairs (before training)."""
        prev = self.record(k - 1) if k > 1 else None
        if prev is None or not prev.get("trained") or not pairs:
            return {"implicit_accuracy_before": None, "implicit_margin_before": None}
        policy, ref = self.model(self.abs_path(prev["policy"])), self.model(self.abs_path(prev["reference"]))
        res = preference_eval(policy, self.tokenizer, [str(pairs_file)], reference=ref, beta=self.cfg.loss.beta,
                              max_length=self.cfg.data.max_length, max_prompt_length=self.cfg.prompt_budget,
                              device=self.device, precision=self.precision)
        return {"implicit_accuracy_before": res.get("rewards/accuracies"),
                "implicit_margin_before": res.get("rewards/margins")}

    def train(self, k: int, start: str, reference: str, pairs_file: Path, out: Path) -> dict[str, Any]:
        """The round's DPO run (``dpokit dpo`` on the round's pairs); returns its last logged metrics."""
        from dpokit.train.dpo import run_dpo

        cfg = copy.deepcopy(self.cfg)
        cfg.model.name_or_path = start
        loss = resolve_loss(cfg.loss)
        cfg.model.ref_name_or_path = reference if loss.reference and reference != start else None
        cfg.data.train_files, cfg.data.eval_files = [str(pairs_file)], []
        cfg.train.seed = round_seed(self.cfg.train.seed, k, "dpo")
        cfg.output_dir = str(out)
        try:
            final = run_dpo(cfg, overwrite=True)
        finally:
            setup_logging(self.run_dir)  # the round's DPO run logged into its own directory
        lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        last = [r for r in lines if "loss" in r][-1]
        keep = ("step", "loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
        return {"final": final, **{f"dpo/{k_}": last[k_] for k_ in keep if k_ in last}}

    def run_round(self, k: int) -> dict[str, Any]:
        s, t0 = self.settings, time.perf_counter()
        out = self.round_dir(k)
        if out.exists():
            log.info("round %d was not complete: doing it again from its start", k)
            shutil.rmtree(out)
        out.mkdir(parents=True)
        prev = self.record(k - 1) if k > 1 else None
        before = self.abs_path(prev["policy"]) if prev else self.initial_path  # the policy after round k-1
        start = self.initial_path if s.start == "initial" else before
        reference = self.initial_path if s.reference == "initial" else before
        idx = self.round_prompts(k)
        prompts = [self.prompts[i] for i in idx]
        log.info("round %d/%d: %d prompts x %d samples from %s", k, s.rounds, len(prompts), s.n,
                 "the initial model" if start == self.initial_path else start)
        samples = sample(self.model(start), self.tokenizer, prompts, n=s.n, max_new_tokens=s.max_new_tokens,
                         temperature=s.temperature, seed=round_seed(self.cfg.train.seed, k, "sample"),
                         device=self.device, precision=self.precision, what=f"round {k}: sampling")
        result, judged = self.pair(k, samples, prompts, out)
        pairs_file = out / "pairs.jsonl"
        _write_jsonl(pairs_file, result.records)
        log.info("round %d: %s", k, result.summary())
        rec: dict[str, Any] = {"round": k, "prompts": len(prompts), "prompt_indices": idx, "samples": len(samples),
                               **judged, "pairs": len(result.records),
                               "prompts_without_pair": result.prompts_without_pair,
                               "pairs_left_out": dict(result.dropped)}
        rec.update(self.implicit_before(k, pairs_file, len(result.records)))
        if result.records:
            trained = self.train(k, start, reference, pairs_file, out / "dpo")
            policy_path = str(Path(trained.pop("final")).relative_to(self.run_dir))
            rec.update(trained, trained=True)
        else:
            log.warning("round %d made no pair (every prompt's samples tied): the policy is not trained this round",
                        k)
            policy_path = start if start == self.initial_path else str(Path(start).relative_to(self.run_dir))
            rec["trained"] = False
        rec["policy"] = policy_path
        rec["reference"] = reference if reference == self.initial_path else \
            str(Path(reference).relative_to(self.run_dir))
        self.forget(keep=[self.abs_path(policy_path), self.abs_path(rec["reference"])])
        rec.update(self.evaluate(k, self.model(self.abs_path(policy_path)), out))
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        _write_json(out / ROUND_FILE, rec)
        return rec

    def round_zero(self) -> dict[str, Any]:
        out = self.round_dir(0)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        rec: dict[str, Any] = {"round": 0, "policy": self.initial_path, "reference": self.initial_path,
                               "trained": False, "judge_calls": 0}
        rec.update(self.evaluate(0, self.initial, out))
        _write_json(out / ROUND_FILE, rec)
        return rec


# ------------------------------------------------------------------------------------------ run records
METRIC_KEYS = ("judge_calls_total", "sample_reward", "pairs", "prompts_without_pair", "implicit_accuracy_before",
               "implicit_margin_before", "dpo/step", "dpo/loss", "dpo/rewards/accuracies", "dpo/rewards/margins",
               "eval/reward", "eval/reward_stderr", "eval/kl", "eval/kl_stderr", "eval/win_rate",
               "eval/win_rate_ties_half", "seconds")


def metrics_lines(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """RUN/metrics.jsonl: one line per round (``step`` = round), the judge budget accumulated over rounds."""
    out, budget = [], 0
    for r in records:
        budget += int(r.get("judge_calls", 0))
        line = {"step": r["round"], **{k: r[k] for k in METRIC_KEYS if r.get(k) is not None}}
        line["judge_calls_total"] = budget
        out.append(line)
    return out


def _fmt(v: Any, spec: str = ".3f", se: Any = None) -> str:
    if v is None:
        return "-"
    text = format(v, spec) if isinstance(v, float) else str(v)
    return text + (f" ± {se:.3f}" if isinstance(se, float) else "")


def summary_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table across rounds."""
    head = ("| round | judge calls (total) | sample reward | pairs | prompts without a pair | implicit acc. before | "
            "DPO steps | held-out reward | KL to initial | win rate vs initial |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for line, r in zip(metrics_lines(records), records):
        lines.append("| " + " | ".join([
            str(r["round"]), str(line["judge_calls_total"]), _fmt(r.get("sample_reward")), _fmt(r.get("pairs")),
            _fmt(r.get("prompts_without_pair")), _fmt(r.get("implicit_accuracy_before")), _fmt(r.get("dpo/step")),
            _fmt(r.get("eval/reward"), se=r.get("eval/reward_stderr")),
            _fmt(r.get("eval/kl"), se=r.get("eval/kl_stderr")), _fmt(r.get("eval/win_rate"))]) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class OnlineResult:
    run_dir: Path
    rounds: list[dict[str, Any]]

    @property
    def final(self) -> Path:
        """The policy after the last round (the initial model's path as given when no round trained)."""
        last = self.rounds[-1]["policy"]
        return self.run_dir / last if (self.run_dir / last).exists() else Path(last)


def _compare(stored: dict[str, Any], now: dict[str, Any]) -> None:
    diff = [f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(stored) | set(now))
            if stored.get(k) != now.get(k)]
    if diff:
        raise ConfigError(f"--resume with other settings than the run was started with ({'; '.join(diff[:6])}); give "
                          "the same options (or only --output-dir and --resume), or start a new run")


def stored_run(run_dir: Path) -> tuple[OnlineSettings, Config] | None:
    """The settings and config a run directory was started with (None: no online run there)."""
    from dpokit.config import load_config

    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    cfg_path = run_dir / "config.yaml"
    return OnlineSettings(**data["settings"]), load_config(cfg_path, stage="dpo")


def run_online(cfg: Config, settings: OnlineSettings, judge: Any, eval_judge: Any = None, *, resume: bool = False,
               overwrite: bool = False) -> OnlineResult:
    """Run (or resume) an online DPO run; ``judge`` has ``score(prompts, completions)`` or ``compare(prompt, a, b)``;
    ``eval_judge`` (default: ``judge``) scores the held-out samples."""
    from dpokit.config import save_config
    from dpokit.report import write_report, write_run_info
    from dpokit.resolved import config_header, resolve_run_config

    settings.check()
    check_online_config(cfg)
    cfg.validate("dpo")
    if _is_pairwise(judge):
        try:
            check_pairwise_mode(settings.mode, settings.n)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    run_dir = Path(cfg.output_dir)
    device = pick_device(cfg.model.device)
    precision = resolve_precision(cfg.precision, device)
    given, cfg = cfg, resolve_run_config(cfg, "dpo", precision)
    claim_run_dir(run_dir, cfg, "latest" if resume else None, overwrite)
    try:
        setup_logging(run_dir)
        stored = run_dir / SETTINGS_FILE
        now = {"settings": asdict(settings), "config": {**to_dict(cfg), "output_dir": None}}
        if resume and stored.is_file():
            before = json.loads(stored.read_text())
            _compare(before["settings"], now["settings"])
            _compare(before["config"], now["config"])
        else:
            _write_json(stored, now)
            save_config(cfg, run_dir / "config.yaml", header=config_header(cfg, given, device))
        torch.manual_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        from dpokit.train.rl import use_chat

        chat = use_chat(tok, settings.chat, cfg.model.name_or_path)

        def wrap(texts: list[str]) -> list[Text]:
            return [[{"role": "user", "content": p}] for p in texts] if chat else list(texts)

        run = Online(cfg, settings, judge, eval_judge if eval_judge is not None else judge, run_dir, device,
                     precision, tok, wrap(read_prompts(settings.prompts)),
                     wrap(read_prompts(settings.eval_prompts, "--eval-prompts")) if settings.eval_prompts else [])
        run.initial = freeze(load_model(cfg.model.name_or_path, cfg.model.trust_remote_code)).to(device)
        write_run_info(run_dir, stage="online", model=cfg.model.name_or_path, reference=cfg.model.name_or_path,
                       data={"train": [settings.prompts], "eval": [settings.eval_prompts] if settings.eval_prompts
                             else []},
                       loss={"name": cfg.loss.name, "beta": cfg.loss.beta, "pairing": settings.mode},
                       steps_total=settings.rounds, status="running", device=str(device), precision=precision)
        records = []
        for k in range(settings.rounds + 1):
            rec = run.record(k)
            if rec is None:
                rec = run.round_zero() if k == 0 else run.run_round(k)
                if k:
                    log.info("round %d: %s", k, ", ".join(f"{key}={rec[key]:.4g}" for key in
                                                         ("sample_reward", "eval/reward", "eval/kl") if
                                                         isinstance(rec.get(key), float)))
            else:
                log.info("round %d: complete (resumed past it)", k)
            records.append(rec)
            _write_jsonl(run_dir / "metrics.jsonl", metrics_lines(records))
            (run_dir / "summary.md").write_text(summary_table(records))
            write_run_info(run_dir, steps_done=k)
            write_report(run_dir)
        write_run_info(run_dir, status="finished")
        write_report(run_dir)
        print(summary_table(records))
        return OnlineResult(run_dir, records)
    except BaseException as e:
        from dpokit.report import write_run_info as info

        if (run_dir / "run.json").is_file():
            status = "interrupted" if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "TrainingInterrupted" \
                else "failed"
            info(run_dir, status=status, error=f"{type(e).__name__}: {e}"[:300])
        raise
    finally:
        release_run_dir(run_dir)
