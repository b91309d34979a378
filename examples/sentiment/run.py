"""The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, Sec. 6.1, Fig. 2), redone against the
KL-regularized optimum, with frontier points from snapshots along training.

Reference: SmolLM2-135M-Instruct (embedded). Reward: VADER compound sentiment of the continuation. Prompts:
``dpokit.demo.prompt_pool()`` (525 training and 100 held-out movie-review prefixes, openings disjoint).

1. Reference samples (committed under ``results/reference/``; ``--regenerate`` draws them again): 8 per training
   prompt (the on-policy pairs) and 64 per held-out prompt (Best-of-N and the ceiling), fp32, 32 new tokens.
2. Pairs: best vs worst of the 8 samples of each training prompt (or, ``--pairs all6``, all 6 pairs of the
   first 4, the paper's shape), ranked by VADER; ties skipped and counted.
3. DPO at several beta and IPO, one epoch each, with weights snapshots along training; every snapshot and the
   final model are evaluated on the held-out prompts: mean VADER reward and KL(policy || reference) from the
   policy's samples, per prompt.
4. A Bradley-Terry reward model on the same pairs (``dpokit rm``), held-out pair accuracy on the best-vs-worst
   pairs of the held-out prompts' first 8 samples.
5. Best-of-N from the reference's samples: by VADER (unbiased reward at the tie-aware KL), by the learned
   reward model, and by one DPO run's implicit reward beta*log(pi/pi_ref) (both measured by VADER).
6. The ceiling (exponential tilting of the 64 samples per held-out prompt) and every point's efficiency:
   (reward - reference reward) / (ceiling at its KL - reference reward), bootstrap over prompts.

    python examples/sentiment/run.py            # the full run (README: wall time measured on 2 CPU cores)
    python examples/sentiment/run.py --quick    # a smaller run, under 10 minutes
    python examples/sentiment/run.py --replot   # redraw plot and table from frontier.json
    python examples/sentiment/run.py --partial  # report the runs finished so far, training nothing more

Writes ``results/{full,quick}/frontier.json``, ``frontier.png`` and ``table.md``. Runs finished before an
interruption are kept (``runs/NAME/points.json``) and not repeated; a run trained but not yet evaluated is
evaluated without training again. Snapshots are deleted once evaluated
(``--keep-snapshots`` keeps them; 540 MB each).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 threads on a shared 2-core machine: sleep, do not spin

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from dpokit.config import Config  # noqa: E402
from dpokit.demo import prompt_pool, sentiment, sentiment_task, vader  # noqa: E402
from dpokit.eval.evaluate import build_pairs  # noqa: E402
from dpokit.eval.frontier import (  # noqa: E402
    Point,
    add_efficiency,
    best_of_n_by_points,
    best_of_n_points,
    ceiling_points,
    evaluate_models,
    run_models,
    upper_envelope,
)
from dpokit.eval.stats import spearman  # noqa: E402
from dpokit.train.rundir import setup_logging  # noqa: E402

HERE = Path(__file__).parent
REFERENCE = HERE / "results" / "reference"
MAX_NEW_TOKENS = 32
SAMPLE_BATCH = 64
# name -> (pool split, samples per prompt, seed)
POOL_SETS = {"pool-train": ("train", 8, 0), "pool-heldout": ("heldout", 64, 1)}


@dataclass(frozen=True)
class Variant:
    loss: str
    beta: float
    lr: float

    @property
    def name(self) -> str:
        return f"{'dpo' if self.loss == 'sigmoid' else self.loss}-beta{self.beta:g}-lr{self.lr:g}"

    @property
    def label(self) -> str:
        return f"{'DPO' if self.loss == 'sigmoid' else self.loss.upper()} β={self.beta:g}"


@dataclass(frozen=True)
class Plan:
    train_prompts: int  # the first ones of the pool's 525
    eval_prompts: int  # the first ones of the pool's 100 held out
    pairs: str  # "bw8": best vs worst of 8; "all6": all 6 pairs of the first 4
    variants: tuple[Variant, ...]
    batch_size: int
    snapshots: int  # snapshots along the epoch (the final model is one more point)
    eval_samples: int  # samples per held-out prompt and model
    select_k: int  # reference samples per held-out prompt scored by the reward model and the implicit reward
    bon_ns: tuple[int, ...]
    rm_lr: float
    rm_epochs: float
    implicit_from: str  # the variant whose implicit reward chooses Best-of-N
    n_boot: int = 2000  # bootstrap resamples of each point's efficiency


# the full run: learning rate is what moves KL within one epoch (Adam normalizes the step), so one run at the
# paper-like 5e-6 shows where the paper's setting leaves a 66-step epoch; at 2e-5 a beta grid (0.03 / 0.1 / 0.3:
# beta decides when a pair saturates) and IPO span the KL range, 6 points per run (--variants replaces the grid,
# e.g. sigmoid:1:2e-5). The reward model learns at 1e-4, not at DPO's 2e-5: its new scalar head starts at std 0.02
# and 66 Adam steps of ~1e-5 move each weight ~1e-3; at 2e-5 its held-out pair accuracy stayed 0.55, at 1e-4 it
# reached 0.75 (one epoch, 4.4 min idle)
FULL = Plan(525, 100, "bw8", (Variant("sigmoid", 0.1, 5e-6), Variant("sigmoid", 0.03, 2e-5),
                              Variant("sigmoid", 0.1, 2e-5), Variant("sigmoid", 0.3, 2e-5), Variant("ipo", 0.5, 2e-5)),
            batch_size=8, snapshots=5, eval_samples=1, select_k=16, bon_ns=(1, 2, 4, 8, 16, 32, 64), rm_lr=1e-4,
            rm_epochs=1.0, implicit_from="dpo-beta0.1-lr2e-05")
# --quick: 8 steps per run, at a learning rate 10x the full run's paper-like 5e-6 so that its points leave KL 0
# (at 5e-6 they stay below 0.01 nats): a smoke run of every piece, not the experiment
QUICK = Plan(64, 20, "bw8", (Variant("sigmoid", 0.1, 5e-5), Variant("ipo", 0.5, 5e-5)), batch_size=8, snapshots=3,
             eval_samples=1, select_k=8, bon_ns=(1, 2, 4, 8, 16, 32, 64), rm_lr=1e-5, rm_epochs=1.0,
             implicit_from="dpo-beta0.1-lr5e-05", n_boot=400)


# ------------------------------------------------------------------------------------------ samples
def read_set(name: str, reference: Path = REFERENCE) -> list[dict]:
    return [json.loads(ln) for ln in (reference / f"{name}.jsonl").read_text().splitlines()]


def by_prompt(rows: list[dict], key: str, prompts: int, k: int | None = None) -> list[list[float]]:
    """``key`` of each prompt's samples (prompt_index < prompts), the first ``k`` of each, in sample order."""
    out: list[list[float]] = [[] for _ in range(prompts)]
    for r in rows:
        i = r["prompt_index"]
        if i < prompts and (k is None or len(out[i]) < k):
            out[i].append(r[key])
    return out


def regenerate(cache_dir: str | None, only: list[str], reference: Path = REFERENCE) -> None:
    """Draw the pool's reference samples: fp32, temperature 1, 32 new tokens, batches of 64 (the batch decides
    the random stream), VADER-scored; written with their provenance."""
    import torch
    import transformers
    from ceiling import cpu_summary

    from dpokit.eval.sampling import sample

    task = sentiment_task(cache_dir, 75, 20, MAX_NEW_TOKENS, precision="fp32")
    pool = prompt_pool()
    prov_path = reference / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    for name in only:
        split, n, seed = POOL_SETS[name]
        prompts = pool.train if split == "train" else pool.heldout
        t0 = time.perf_counter()
        drawn = sample(task.reference, task.tokenizer, prompts, n=n, seed=seed, batch_size=SAMPLE_BATCH, **task.gen)
        scores = sentiment(task.analyzer, [s.text for s in drawn])
        (reference / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt_index": s.prompt_index, "text": s.text, "score": sc,
                        "completion_ids": s.completion_ids}) + "\n" for s, sc in zip(drawn, scores)))
        prov[name] = {
            "prompts": f"dpokit.demo.prompt_pool().{split}", "prompts_drawn": len(prompts), "samples_per_prompt": n,
            "seed": seed,
            "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "batch_size": SAMPLE_BATCH,
            "precision": task.precision, "model": task.model_dir.name, "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(), "cpu": cpu_summary(),
            "prompt_index": f"index into prompt_pool().{split}", "seconds": round(time.perf_counter() - t0),
        }
    prov_path.write_text(json.dumps(prov, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------- pairs
def make_pairs(rows: list[dict], prompts: list[str], shape: str) -> tuple[list[dict], int]:
    """On-policy pairs ranked by VADER: 'bw8' best vs worst of 8; 'all6' every strictly ordered pair of the
    first 4 (ties skipped); returns (records, prompts skipped: all samples tied)."""
    from dpokit.eval.sampling import Sample

    k = 8 if shape == "bw8" else 4
    kept = [r for r in rows if r["prompt_index"] < len(prompts)]
    per: dict[int, int] = {}
    samples, scores = [], []
    for r in kept:
        if per.get(r["prompt_index"], 0) < k:
            per[r["prompt_index"]] = per.get(r["prompt_index"], 0) + 1
            samples.append(Sample(r["prompt_index"], [], r["completion_ids"], r["text"]))
            scores.append(r["score"])
    return build_pairs(samples, scores, prompts, "best-worst" if shape == "bw8" else "all-pairs", 1)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- training
def base_config(model_dir: Path, pairs: Path, out: Path, plan: Plan, precision: str) -> Config:
    cfg = Config()
    cfg.model.name_or_path = str(model_dir)
    cfg.data.train_files = [str(pairs)]
    cfg.data.max_length, cfg.data.max_prompt_length = 128, 64
    cfg.train.batch_size, cfg.train.epochs, cfg.train.seed = plan.batch_size, 1.0, 0
    cfg.precision, cfg.output_dir = precision, str(out)
    return cfg


def snapshot_every(n_pairs: int, plan: Plan) -> int:
    steps = math.ceil(n_pairs / plan.batch_size)
    return max(1, math.ceil(steps / (plan.snapshots + 1)))


class VaderJudge:
    def __init__(self) -> None:
        self.analyzer = vader()

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return sentiment(self.analyzer, list(completions))


def train_and_evaluate(v: Variant, task: Any, pairs: Path, n_pairs: int, plan: Plan, out: Path,
                       eval_prompts: list[str], keep_snapshots: bool) -> list[Point]:
    """One run with snapshots; every snapshot and final/ evaluated on the held-out prompts (cached in
    runs/NAME/points.json)."""
    from dpokit.train.dpo import run_dpo

    run = out / "runs" / v.name
    done = run / "points.json"
    if done.is_file():
        return [Point(**p) for p in json.loads(done.read_text())]
    cfg = base_config(task.model_dir, pairs, run, plan, task.precision)
    cfg.loss.name, cfg.loss.beta, cfg.train.lr = v.loss, v.beta, v.lr
    cfg.train.snapshot_steps = snapshot_every(n_pairs, plan)
    cfg.validate()
    timing = run / "train_seconds.json"
    if timing.is_file() and (run / "final" / "config.json").is_file():  # trained; its evaluation was interrupted
        trained = json.loads(timing.read_text())
    else:
        t0 = time.perf_counter()
        run_dpo(cfg, overwrite=True)
        trained = time.perf_counter() - t0
        timing.write_text(json.dumps(trained))
    models = run_models(run)
    points = evaluate_models([(label, path) for label, path, _ in models], task.reference, task.tokenizer,
                             eval_prompts, VaderJudge(), method=v.name, steps=[s for _, _, s in models],
                             n=plan.eval_samples, seed=11, **task.gen)
    for p in points:
        p.info.update({"loss": v.loss, "beta": v.beta, "lr": v.lr, "train_seconds": round(trained)})
    done.write_text(json.dumps([p.to_dict() for p in points]))
    if not keep_snapshots:
        shutil.rmtree(run / "snapshots", ignore_errors=True)
    return points


# --------------------------------------------------------------------------------------------- the run
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller run, under 10 minutes")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    ap.add_argument("--cache-dir", default=None, help="model cache (default: $DPOKIT_CACHE or ~/.cache/dpokit)")
    ap.add_argument("--pairs", choices=["bw8", "all6"], default=None, help="pair shape (default: the plan's)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="LOSS:BETA:LR",
                    help="the DPO/IPO runs, e.g. sigmoid:0.1:5e-6 ipo:0.5:5e-6 (default: the plan's)")
    ap.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: the plan's)")
    ap.add_argument("--name", default=None, help="results subdirectory (default: full or quick)")
    ap.add_argument("--regenerate", nargs="*", choices=sorted(POOL_SETS), default=None,
                    help="draw these reference sample sets again (all when none is named)")
    ap.add_argument("--reference", default=str(REFERENCE), help="directory of the reference sample sets")
    ap.add_argument("--keep-snapshots", action="store_true", help="keep each run's snapshots after evaluation")
    ap.add_argument("--partial", action="store_true",
                    help="report what is finished (runs, reward model, implicit scores) without training more")
    ap.add_argument("--replot", action="store_true", help="redraw plot and table from frontier.json")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    if args.pairs:
        plan = replace(plan, pairs=args.pairs)
    if args.batch_size:
        plan = replace(plan, batch_size=args.batch_size)
    if args.variants:
        plan = replace(plan, variants=tuple(Variant(a, float(b), float(c)) for a, b, c in
                                            (s.split(":") for s in args.variants)))
    out = Path(args.out) / (args.name or ("quick" if args.quick else "full"))
    if args.replot:
        result = json.loads((out / "frontier.json").read_text())
        plot(result, out / "frontier.png")
        (out / "table.md").write_text(table(result))
        print(table(result))
        return
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    t_start = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        phases[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    reference = Path(args.reference)
    if args.regenerate is not None:
        regenerate(args.cache_dir, args.regenerate or sorted(POOL_SETS), reference)
    for name in POOL_SETS:
        if not (reference / f"{name}.jsonl").is_file():
            raise SystemExit(f"{reference / (name + '.jsonl')}: not found: draw it with --regenerate {name}")
    t = time.perf_counter()
    task = sentiment_task(args.cache_dir, 75, 20, MAX_NEW_TOKENS, precision="fp32")  # as the reference samples
    pool = prompt_pool()
    train_prompts, eval_prompts = pool.train[: plan.train_prompts], pool.heldout[: plan.eval_prompts]
    train_rows, heldout_rows = read_set("pool-train", reference), read_set("pool-heldout", reference)
    for name, rows, need in (("pool-train", train_rows, plan.train_prompts),
                             ("pool-heldout", heldout_rows, plan.eval_prompts)):
        have = len({r["prompt_index"] for r in rows})
        if have < need:
            raise SystemExit(f"{reference / (name + '.jsonl')}: samples for {have} prompts, this run needs {need}: "
                             f"draw them with --regenerate {name}")
    ref_rewards = by_prompt(heldout_rows, "score", plan.eval_prompts)  # [P][64]

    # pairs for DPO/IPO and the reward model; held-out pairs for the reward model's accuracy
    records, skipped = make_pairs(train_rows, train_prompts, plan.pairs)
    pairs_path = write_jsonl(out / "pairs.jsonl", records)
    eval_records, _ = make_pairs(heldout_rows, eval_prompts, "bw8")
    eval_pairs_path = write_jsonl(out / "heldout-pairs.jsonl", eval_records)
    t = lap("setup", t)

    # DPO / IPO runs, each evaluated at its snapshots (with --partial: only the runs already finished)
    points: list[Point] = []
    not_run = []
    for v in plan.variants:
        if args.partial and not (out / "runs" / v.name / "points.json").is_file():
            not_run.append(v.name)
            continue
        t0 = time.perf_counter()
        points += train_and_evaluate(v, task, pairs_path, len(records), plan, out, eval_prompts, args.keep_snapshots)
        phases[f"run {v.name}"] = round(time.perf_counter() - t0, 1)
    t = time.perf_counter()

    # the reward model, and Best-of-N under it
    select_rows = first_k(heldout_rows, plan.eval_prompts, plan.select_k)
    scores = [r["score"] for r in select_rows]
    vader_sel = by_rows(select_rows, scores, plan.eval_prompts)
    select_ns = [n for n in plan.bon_ns if n <= plan.select_k]
    rm_final = out / "runs" / "rm" / "final"
    reward_model, bon_rm = None, []
    if not args.partial or (out / "rm-scores.json").is_file():
        if not (rm_final / "config.json").is_file():
            from dpokit.train.rm import run_rm

            cfg = base_config(task.model_dir, pairs_path, out / "runs" / "rm", plan, task.precision)
            cfg.train.lr, cfg.train.epochs = plan.rm_lr, plan.rm_epochs
            cfg.data.eval_files = [str(eval_pairs_path)]
            cfg.validate("rm")
            run_rm(cfg)
        t = lap("reward model: train", t)
        rm_metrics = [json.loads(ln) for ln in (out / "runs" / "rm" / "metrics.jsonl").read_text().splitlines()]
        rm_scores = cached_scores(out / "rm-scores.json", lambda: rm_score(rm_final, eval_prompts, select_rows))
        t = lap("reward model: score held-out samples", t)
        bon_rm = best_of_n_by_points(by_rows(select_rows, rm_scores, plan.eval_prompts), vader_sel, select_ns,
                                     "BoN by reward model", "bon-rm")
        reward_model = {"heldout_pairs": len(eval_records), "heldout_accuracy": rm_metrics[-1].get("eval/accuracy"),
                        "heldout_margin": rm_metrics[-1].get("eval/margin"),
                        "train_accuracy_last": next(m["accuracy"] for m in reversed(rm_metrics) if "accuracy" in m),
                        "spearman_vs_vader": spearman(rm_scores, scores), "samples": len(scores)}

    # the implicit reward of one DPO run, and Best-of-N under it
    implicit_reward, bon_imp = None, []
    if not args.partial or (out / "implicit-scores.json").is_file():
        implicit_run = out / "runs" / plan.implicit_from
        implicit = cached_scores(out / "implicit-scores.json",
                                 lambda: implicit_score(implicit_run, task, eval_prompts, select_rows))
        t = lap("implicit reward: score held-out samples", t)
        bon_imp = best_of_n_by_points(by_rows(select_rows, implicit, plan.eval_prompts), vader_sel, select_ns,
                                      "BoN by implicit reward", "bon-implicit")
        implicit_reward = {"run": plan.implicit_from, "spearman_vs_vader": spearman(implicit, scores),
                           "samples": len(scores)}

    bon = best_of_n_points(ref_rewards, plan.bon_ns)
    bon_sel = best_of_n_points(vader_sel, select_ns, label=f"Best-of-N (K={plan.select_k})", method="best-of-n-k")
    everything = points + bon + bon_sel + bon_rm + bon_imp
    add_efficiency(everything, ref_rewards, n_boot=plan.n_boot)
    t = lap("efficiency", t)
    result = {
        "plan": asdict(plan), "precision": task.precision, "pairs": len(records), "pairs_prompts_skipped": skipped,
        "eval_prompts": plan.eval_prompts, "reference_samples_per_prompt": len(ref_rewards[0]),
        "partial": args.partial, "runs_not_done": not_run,
        "reward_model": reward_model, "implicit_reward": implicit_reward,
        "points": [p.to_dict() for p in everything],
        "envelopes": {v.name: [p.label for p in upper_envelope([p for p in points if p.method == v.name])]
                      for v in plan.variants if v.name not in not_run},
        "ceiling": ceiling_points(ref_rewards),
        "reference_reward": float(np.mean([np.mean(v) for v in ref_rewards])),
        "phases_seconds": phases, "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "frontier.png")
    (out / "table.md").write_text(table(result))
    print(table(result))
    print(f"\nwall time {result['seconds']:.0f} s; results in {out}")


def first_k(rows: list[dict], prompts: int, k: int) -> list[dict]:
    """The first k samples of each of the first ``prompts`` prompts, in file order."""
    seen: dict[int, int] = {}
    out = []
    for r in rows:
        i = r["prompt_index"]
        if i < prompts and seen.get(i, 0) < k:
            seen[i] = seen.get(i, 0) + 1
            out.append(r)
    return out


def by_rows(rows: list[dict], values: list[float], prompts: int) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in range(prompts)]
    for r, v in zip(rows, values):
        out[r["prompt_index"]].append(v)
    return out


def cached_scores(path: Path, make: Any) -> list[float]:
    if path.is_file():
        return json.loads(path.read_text())
    values = make()
    path.write_text(json.dumps(values))
    return values


def rm_score(final: Path, prompts: list[str], rows: list[dict]) -> list[float]:
    from dpokit.eval.judges import RewardModelJudge

    judge = RewardModelJudge(str(final), batch_size=64)
    return judge.score([prompts[r["prompt_index"]] for r in rows], [r["text"] for r in rows])


def implicit_score(run: Path, task: Any, prompts: list[str], rows: list[dict]) -> list[float]:
    from dpokit.data.formats import SFTExample
    from dpokit.eval.implicit import ImplicitReward, resolve_run
    from dpokit.models import freeze, load_model

    found = resolve_run(run)
    policy = freeze(load_model(str(found.model_dir))).to(task.device)
    scorer = ImplicitReward(policy, task.reference, task.tokenizer, float(found.get("loss.beta")), batch_size=64,
                            device=task.device, precision=task.precision, max_length=128, max_prompt_length=64)
    return scorer.score_examples([SFTExample(prompts[r["prompt_index"]], r["text"]) for r in rows]).reward


# ----------------------------------------------------------------------------------------- reporting
METHODS = {  # method prefix -> (legend, color, marker)
    "best-of-n": ("Best-of-N, VADER (K=64, tie-aware KL)", "tab:gray", "s"),
    "bon-rm": ("Best-of-N, learned reward model", "tab:green", "D"),
    "bon-implicit": ("Best-of-N, DPO implicit reward", "tab:purple", "v"),
}


def _method_style(method: str) -> tuple[str, str, str]:
    if method in METHODS:
        return METHODS[method]
    if method.startswith("ipo"):
        return "IPO", "tab:orange", "^"
    return "DPO", "tab:blue", "o"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [Point(**p) for p in result["points"]]
    fig, ax = plt.subplots(figsize=(7.4, 5.0), dpi=120)
    curve = [c for c in result["ceiling"] if math.isfinite(c["kl"])]
    ax.plot([c["kl"] for c in curve], [c["reward"] for c in curve], color="black", lw=1.5,
            label=f"ceiling π*_β (tilting K={result['reference_samples_per_prompt']})")
    for method in ("best-of-n", "bon-rm", "bon-implicit"):
        ps = sorted((p for p in pts if p.method == method), key=lambda p: p.kl)
        if not ps:
            continue
        legend, color, marker = METHODS[method]
        ax.errorbar([p.kl for p in ps], [p.reward for p in ps], yerr=[p.reward_stderr for p in ps], marker=marker,
                    ms=4, color=color, capsize=2, lw=1, label=legend)
    runs = [m for m in result["envelopes"]]
    drawn: set[str] = set()
    for method in runs:
        mine = [p for p in pts if p.method == method]
        legend, color, marker = _method_style(method)
        beta = mine[0].info.get("beta") if mine else None
        ax.scatter([p.kl for p in mine], [p.reward for p in mine], color=color, marker=marker, s=12, alpha=0.35)
        env = upper_envelope(mine)
        ax.plot([p.kl for p in env], [p.reward for p in env], color=color, marker=marker, ms=3, lw=0.8, alpha=0.8,
                label=f"{legend} (points: checkpoints; lines: each β's envelope)" if legend not in drawn else None)
        drawn.add(legend)
        if env:
            ax.annotate(f"β={beta:g}", (env[-1].kl, env[-1].reward), textcoords="offset points", xytext=(3, 3),
                        fontsize=7, color=color)
    for legend in ("DPO", "IPO"):  # each method's envelope over all its runs
        color = "tab:blue" if legend == "DPO" else "tab:orange"
        mine = [p for p in pts if p.method in runs and _method_style(p.method)[0] == legend]
        env = upper_envelope(mine)
        if env:
            ax.plot([p.kl for p in env], [p.reward for p in env], color=color, lw=2.2, alpha=0.6,
                    label=f"{legend} upper envelope")
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence")
    ax.set_ylabel("mean VADER compound sentiment (held-out prompts)")
    ax.set_xlim(left=-0.05, right=max(2.5, max(p.kl for p in pts if p.method in runs) * 1.1 if runs else 2.5))
    ax.set_title(f"Controlled sentiment, SmolLM2-135M: {result['eval_prompts']} held-out prompts", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(result: dict) -> str:
    pts = [Point(**p) for p in result["points"]]
    lines = ["| method | point | KL (nats) | mean VADER | efficiency |", "|---|---|---|---|---|"]
    for p in pts:
        e = p.efficiency or {}
        eff = f"{e['efficiency']:.0%} ± {e['stderr']:.0%}" if e and math.isfinite(e.get("efficiency", math.nan)) \
            else "—"
        if e.get("beyond_support"):
            eff += " (beyond the ceiling's KL)"
        style = _method_style(p.method)[0]
        beta = f"β={p.info['beta']:g}" if "beta" in p.info else ""
        beta += f" lr {p.info['lr']:g}" if "lr" in p.info else ""
        lines.append(f"| {style if p.method in result['envelopes'] else p.method} {beta} | {p.label} | {p.kl:.3f} ± "
                     f"{p.kl_stderr:.3f} | {p.reward:+.3f} ± {p.reward_stderr:.3f} | {eff} |")
    rm, imp = result["reward_model"], result["implicit_reward"]
    best = max((p for p in pts if p.method in result["envelopes"] and p.efficiency),
               key=lambda p: p.efficiency["efficiency"], default=None)
    lines += ["", f"reference reward {result['reference_reward']:+.3f}; {result['pairs']} training pairs "
                  f"({result['plan']['pairs']}); precision {result['precision']}; wall time {result['seconds']:.0f} s"]
    if result.get("runs_not_done"):
        lines.append(f"PARTIAL: runs not done: {', '.join(result['runs_not_done'])}")
    lines.append(f"reward model: held-out pair accuracy {rm['heldout_accuracy']:.3f} on {rm['heldout_pairs']} "
                 f"best-vs-worst pairs; Spearman vs VADER {rm['spearman_vs_vader']:.3f} on {rm['samples']} held-out "
                 "reference samples" if rm else "reward model: not done")
    lines.append(f"implicit reward of {imp['run']}: Spearman vs VADER {imp['spearman_vs_vader']:.3f} on "
                 f"{imp['samples']} held-out reference samples" if imp else "implicit reward: not done")
    if best is not None:
        e = best.efficiency
        lines.append(f"best DPO/IPO point: {best.method} {best.label}: efficiency {e['efficiency']:.0%} ± "
                     f"{e['stderr']:.0%} (95% {e['low']:.0%} … {e['high']:.0%}) at KL {best.kl:.3f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
