"""A reward-KL frontier from models along training: each point is a model's mean reward under a judge and its
KL(model || reference), both on held-out prompts, with standard errors and per-prompt values (what efficiency
against the KL-regularized ceiling needs, ``dpokit.eval.stats.efficiency``).

* ``run_models(run)``: the models of a run in training order: every weights snapshot
  (``train.snapshot_steps`` writes ``RUN/snapshots/step-N/``), then ``final/``;
* ``evaluate_models(points, ...)``: any list of (label, model or model directory): n samples per prompt from
  each, scored by a reward judge; KL from the same samples, log pi(y|x) - log pi_ref(y|x) summed over the
  sampled tokens (unbiased per sequence); means over prompts (the unit shared with the ceiling) with their
  standard errors;
* ``upper_envelope(points)``: the points no other point beats with less or equal KL, as the DPO paper plots
  each method (its Fig. 2 takes every method's frontier over checkpoints and hyperparameters).

``dpokit frontier RUN ... --ref-model REF --prompts P --judge J --out DIR`` does all of it for runs, with
``--ref-samples K`` adding the reference's own K samples per prompt: Best-of-N, the ceiling and each
point's efficiency.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpokit.config import ConfigError
from dpokit.data.formats import Text
from dpokit.eval.judges import RewardJudge
from dpokit.eval.sampling import Sample, sample, score
from dpokit.eval.stats import (
    best_of_n_by,
    bon_kl_bound,
    bon_kl_ties,
    ceiling_curve,
    efficiency,
    expected_best_of_n,
    mean_stderr,
)
from dpokit.progress import Progress

log = logging.getLogger("dpokit")


@dataclass
class Point:
    """One (KL, reward) point: means over prompts of each prompt's mean over its samples, with the standard error
    over prompts. ``prompt_rewards``/``prompt_kls`` [P] are in the order of the prompts evaluated."""

    label: str
    method: str
    reward: float
    reward_stderr: float
    kl: float
    kl_stderr: float
    prompt_rewards: list[float]
    prompt_kls: list[float]
    samples: int
    step: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    efficiency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, label: str, method: str, prompt_rewards: Sequence[float], prompt_kls: Sequence[float],
           samples: int, **kw: Any) -> Point:
        r, rse = mean_stderr(list(prompt_rewards))
        k, kse = mean_stderr(list(prompt_kls))
        return cls(label, method, r, rse, k, kse, [float(x) for x in prompt_rewards], [float(x) for x in prompt_kls],
                   samples, **kw)


def per_prompt(values: Sequence[float], prompt_index: Sequence[int], prompts: int) -> list[float]:
    """Mean of ``values`` within each prompt 0..prompts-1 (every prompt must have at least one value)."""
    sums, counts = np.zeros(prompts), np.zeros(prompts)
    np.add.at(sums, np.asarray(prompt_index, dtype=np.int64), np.asarray(values, dtype=np.float64))
    np.add.at(counts, np.asarray(prompt_index, dtype=np.int64), 1.0)
    if (counts == 0).any():
        raise ValueError(f"prompt {int(np.argmin(counts))} has no samples")
    return (sums / counts).tolist()


def prompt_texts(prompts: Sequence[Text]) -> list[str]:
    """Prompts as a judge sees them: the text, or the last message's content."""
    return [p if isinstance(p, str) else p[-1]["content"] for p in prompts]


def _load(model: Any, device: torch.device) -> tuple[Any, bool]:
    """(model on device, whether it was loaded here and should be freed after use)."""
    if isinstance(model, (str, Path)):
        from dpokit.models import freeze, load_model

        return freeze(load_model(str(model))).to(device), True
    return model, False


def evaluate_models(points: Sequence[tuple[str, Any]], reference: Any, tokenizer: Any, prompts: Sequence[Text],
                    judge: RewardJudge, *, method: str = "", steps: Sequence[int | None] | None = None, n: int = 1,
                    max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0, batch_size: int = 32,
                    device: torch.device | None = None, precision: str = "fp32",
                    samples_out: Path | None = None) -> list[Point]:
    """Each (label, model) point: n samples per prompt (the same seed for every point), their mean judge reward
    and KL(model || reference) per prompt. A model given as a directory is loaded, evaluated and freed before the
    next. ``samples_out``: a JSONL file every sample is appended to (label, prompt_index, text, reward, kl)."""
    device = device or next(reference.parameters()).device
    texts = prompt_texts(prompts)
    pad = tokenizer.pad_token_id
    out = []
    with Progress(f"frontier: {method or 'models'}", total=len(points), unit="model") as bar:
        for j, (label, given) in enumerate(points):
            model, owned = _load(given, device)
            drawn = sample(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                           seed=seed, batch_size=batch_size, device=device, precision=precision)
            rewards = judge.score([texts[s.prompt_index] for s in drawn], [s.text for s in drawn])
            kls = sample_kls(model, reference, drawn, pad, device, precision, batch_size)
            idx = [s.prompt_index for s in drawn]
            point = Point.of(label, method, per_prompt(rewards, idx, len(prompts)), per_prompt(kls, idx, len(prompts)),
                             len(drawn), step=steps[j] if steps is not None else None)
            if samples_out is not None:
                with samples_out.open("a", encoding="utf-8") as f:
                    for s, r, k in zip(drawn, rewards, kls):
                        f.write(json.dumps({"label": label, "method": method, "prompt_index": s.prompt_index,
                                            "text": s.text, "reward": r, "kl": k}) + "\n")
            log.info("%s %s: reward %.4f ± %.4f, KL %.3f ± %.3f (%d samples)", method, label, point.reward,
                     point.reward_stderr, point.kl, point.kl_stderr, len(drawn))
            out.append(point)
            if owned:
                del model
                gc.collect()
            bar.update(1)
    return out


def sample_kls(model: Any, reference: Any, samples: Sequence[Sample], pad_id: int, device: torch.device,
               precision: str, batch_size: int = 32) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) of each sample drawn from ``model`` (its mean is the Monte-Carlo KL)."""
    lp = score(model, samples, pad_id=pad_id, device=device, precision=precision, batch_size=batch_size)
    lr = score(reference, samples, pad_id=pad_id, device=device, precision=precision, batch_size=batch_size)
    return (lp.double() - lr.double()).tolist()


def upper_envelope(points: Sequence[Point]) -> list[Point]:
    """Points that no other point beats on reward at less or equal KL, by increasing KL."""
    best, out = -math.inf, []
    for p in sorted(points, key=lambda p: (p.kl, -p.reward)):
        if p.reward > best:
            out.append(p)
            best = p.reward
    return out


def run_models(run: str | Path) -> list[tuple[str, Path, int | None]]:
    """(label, model directory, step) of every weights snapshot of a run (``RUN/snapshots/step-N``), in step order,
    then ``final/`` (its step: the last one logged)."""
    root = Path(run)
    if (root / "config.json").is_file() and root.name == "final":
        root = root.parent
    found: list[tuple[str, Path, int | None]] = []
    snaps = root / "snapshots"
    if snaps.is_dir():
        for p in sorted(snaps.glob("step-*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1):
            if p.name[5:].isdigit() and (p / "config.json").is_file():
                found.append((f"step {int(p.name[5:])}", p, int(p.name[5:])))
    if (root / "final" / "config.json").is_file():
        found.append(("final", root / "final", _last_step(root)))
    if not found:
        raise FileNotFoundError(f"{run}: no snapshots/step-N/ and no final/ (not a dpokit run directory?)")
    return found


def _last_step(run: Path) -> int | None:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    steps = [json.loads(ln).get("step") for ln in metrics.read_text().splitlines() if ln.strip()]
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None


# ------------------------------------------------------------------------------ from reference samples
def best_of_n_points(ref_rewards: Sequence[Sequence[float]], ns: Sequence[int], label: str = "Best-of-N",
                     method: str = "best-of-n") -> list[Point]:
    """Best-of-N under the true reward from K reference samples per prompt: the unbiased expected best-of-N reward
    at the tie-aware population KL (``bon_kl_ties``: log N - (N-1)/N without ties)."""
    return [Point.of(f"{label} N={n}", method, [expected_best_of_n(v, n) for v in ref_rewards],
                     [bon_kl_ties(v, n) for v in ref_rewards], sum(map(len, ref_rewards)), info={"n": n})
            for n in ns if n <= min(map(len, ref_rewards))]


def best_of_n_by_points(selection: Sequence[Sequence[float]], ref_rewards: Sequence[Sequence[float]],
                        ns: Sequence[int], label: str, method: str) -> list[Point]:
    """Best-of-N choosing by another score (a learned reward model, an implicit reward) among the reference's K
    samples per prompt, measured by the true reward: unbiased E[true reward of the best-by-selection of N draws],
    at KL log N - (N-1)/N (exact for a selection score without ties; tied selection scores are counted in
    ``info``)."""
    ties = sum(len(s) - len(set(s)) for s in selection)
    return [Point.of(f"{label} N={n}", method, [best_of_n_by(s, v, n) for s, v in zip(selection, ref_rewards)],
                     [bon_kl_bound(n)] * len(ref_rewards), sum(map(len, ref_rewards)),
                     info={"n": n, "selection_ties": ties}) for n in ns if n <= min(map(len, ref_rewards))]


def add_efficiency(points: Sequence[Point], ref_rewards: Sequence[Sequence[float]], n_boot: int = 2000) -> None:
    """Each point's efficiency against the ceiling from the same prompts' reference samples (bootstrap s.e.)."""
    for p in points:
        p.efficiency = efficiency(p.prompt_rewards, p.prompt_kls, ref_rewards, n_boot=n_boot).to_dict()


def ceiling_points(ref_rewards: Sequence[Sequence[float]], betas: Sequence[float] | None = None) -> list[dict]:
    """The ceiling curve (exponential tilting of the reference samples) on a beta grid, for plotting."""
    betas = list(betas) if betas is not None else [0.0, *np.geomspace(0.01, 10, 61).tolist(), math.inf]
    return [{"beta": c.beta, "kl": c.kl, "reward": c.reward} for c in ceiling_curve(ref_rewards, betas)]


# -------------------------------------------------------------------------------------- dpokit frontier
def add_frontier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="dpokit run directories (snapshots and final/ of each are evaluated)")
    p.add_argument("--ref-model", required=True, help="the reference the KL is measured against")
    p.add_argument("--prompts", required=True, help="held-out prompts (text lines or JSONL with 'prompt')")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per prompt and model (default: 1)")
    p.add_argument("--ref-samples", type=int, default=0,
                   help="K reference samples per prompt for Best-of-N, the ceiling and efficiency (0: none)")
    p.add_argument("--best-of", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="Best-of-N's N (<= K)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="(default: 1.0: the models' own distributions)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                   help="prompts as user messages in the chat template (default: off)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--out", required=True, help="directory for frontier.json and samples.jsonl")


def frontier_command(args: argparse.Namespace, judge: Any, pairwise: Any) -> int:
    from dpokit.eval.evaluate import read_prompts
    from dpokit.models import freeze, load_model, load_tokenizer, pick_device, resolve_precision

    if judge is None:
        raise ConfigError("dpokit frontier scores samples with a reward judge: --judge or --judge-rm")
    if args.num_samples < 1 or args.ref_samples < 0:
        raise ConfigError("-n must be >= 1 and --ref-samples >= 0")
    runs = {r: run_models(r) for r in args.runs}
    device = pick_device()
    precision = resolve_precision("auto", device)
    prompts: list[Any] = read_prompts(args.prompts)
    if args.chat:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    tokenizer = load_tokenizer(args.ref_model)
    reference = freeze(load_model(args.ref_model)).to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples_path = out / "samples.jsonl"
    samples_path.write_text("")
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "device": device,
           "precision": precision}
    result: dict[str, Any] = {"prompts": len(prompts), "samples_per_prompt": args.num_samples, "runs": {}}
    points: list[Point] = []
    for run, models in runs.items():
        name = Path(run).name
        pts = evaluate_models([(label, path) for label, path, _ in models], reference, tokenizer, prompts, judge,
                              method=name, steps=[s for _, _, s in models], n=args.num_samples, seed=args.seed,
                              samples_out=samples_path, **gen)
        points += pts
        result["runs"][name] = {"path": str(run), "envelope": [p.label for p in upper_envelope(pts)]}
    if args.ref_samples:
        drawn = sample(reference, tokenizer, prompts, n=args.ref_samples, seed=args.seed + 1, **gen)
        scores = judge.score([prompt_texts(prompts)[s.prompt_index] for s in drawn], [s.text for s in drawn])
        ref_rewards: list[list[float]] = [[] for _ in prompts]
        for s, r in zip(drawn, scores):
            ref_rewards[s.prompt_index].append(r)
        bon = best_of_n_points(ref_rewards, args.best_of)
        add_efficiency(points + bon, ref_rewards)
        result["best_of_n"] = [p.to_dict() for p in bon]
        result["ceiling"] = ceiling_points(ref_rewards)
        result["reference_rewards"] = ref_rewards
    result["points"] = [p.to_dict() for p in points]
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    for p in points:
        eff = f"  efficiency {p.efficiency['efficiency']:.0%} ± {p.efficiency['stderr']:.0%}" if p.efficiency else ""
        print(f"{p.method:<20} {p.label:<10} KL {p.kl:7.3f} ± {p.kl_stderr:.3f}  reward {p.reward:+.4f} ± "
              f"{p.reward_stderr:.4f}{eff}")
    print(f"written to {out / 'frontier.json'}")
    return 0
