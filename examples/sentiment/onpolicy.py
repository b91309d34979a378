"""Offline against on-policy methods on the controlled-sentiment task, at equal judge budget, against the ceiling.

The set-up of ``run.py`` (SmolLM2-135M-Instruct, VADER, the prompt pool, its committed reference samples), with
every method given the same judge budget B = P x n (samples scored) on the first P training prompts:

* ``offline``: DPO on best-vs-worst pairs of the first n committed reference samples of each prompt;
* ``rso``: DPO on pairs from the same samples by statistical rejection sampling at beta_rs = beta (Liu et al. 2023);
* ``online``: ``dpokit online``, R rounds of P / R prompts x n samples from the current policy, best-worst pairs;
* ``rloo``: ``dpokit rl``, one pass over the P prompts, k = n samples each, KL penalty beta;
* ``rm-dpo`` and ``rm-rloo``: the same as ``offline`` and ``rloo`` with the reward model ``run.py`` trained (its
  ``runs/rm/final``) as the only reward seen in training: the DPO paper's PPO-vs-DPO comparison under a learned
  reward.

Every model (each snapshot along a run, each online round) is evaluated as ``run.py`` evaluates its runs: samples on
the held-out prompts (the same seed for all), mean VADER reward and KL(policy || reference), per prompt; the
efficiency against the ceiling pi*_beta by tilting the 64 committed reference samples of each held-out prompt. When
``run.py``'s full run is there, its DPO points (B = 525 x 8) are drawn too.

    python examples/sentiment/onpolicy.py --quick    # 32 prompts x 4, 20 held-out prompts, under 10 minutes
    python examples/sentiment/onpolicy.py            # 128 prompts x 4, 100 held-out prompts
    python examples/sentiment/onpolicy.py --replot   # plot and table again (with run.py's latest points)

Writes ``results/onpolicy-{quick,full}/frontier.json``, ``frontier.png`` and ``table.md``. Each method's points are
kept (``runs/NAME/points.json``) and not recomputed; snapshots are deleted once evaluated.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 threads on a shared 2-core machine: sleep, do not spin

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from run import MAX_NEW_TOKENS, REFERENCE, VaderJudge, by_prompt, first_k, read_set, write_jsonl  # noqa: E402

from dpokit.config import Config  # noqa: E402
from dpokit.demo import prompt_pool, sentiment_task  # noqa: E402
from dpokit.eval.frontier import (  # noqa: E402
    Point,
    add_efficiency,
    best_of_n_points,
    ceiling_points,
    evaluate_models,
    run_models,
    upper_envelope,
)
from dpokit.eval.pairing import RSO, BestWorst, pair_scored  # noqa: E402
from dpokit.eval.sampling import Sample  # noqa: E402
from dpokit.eval.stats import ceiling_at_beta  # noqa: E402
from dpokit.train.rundir import setup_logging  # noqa: E402

HERE = Path(__file__).parent
METHODS = {  # name -> (legend, color, marker)
    "offline": ("DPO, offline pairs", "tab:blue", "o"),
    "rso": ("DPO, RSO pairs", "tab:cyan", "P"),
    "online": ("DPO, online rounds", "tab:red", "*"),
    "rloo": ("RLOO", "tab:orange", "^"),
    "rm-dpo": ("DPO, pairs by the reward model", "tab:olive", "o"),
    "rm-rloo": ("RLOO, reward model", "tab:brown", "^"),
}
EVAL_SEED = 11  # run.py's: every model of both scripts is evaluated on the same held-out samples' seed


@dataclass(frozen=True)
class Plan:
    train_prompts: int  # the first P of the pool's 525 training prompts
    n: int  # samples per training prompt: offline/RSO (the first n of the committed 8), each online round, RLOO's k
    rounds: int  # online rounds, each on train_prompts / rounds prompts
    eval_prompts: int  # the first of the pool's 100 held-out prompts
    eval_samples: int  # samples per held-out prompt and model
    beta: float  # DPO's beta, RSO's beta_rs and RLOO's KL penalty
    lr: float  # every DPO run
    rl_lr: float
    rl_batch: int  # prompts per RLOO step
    snapshots: int  # weights snapshots along each DPO and RLOO run (the final model is one more point)
    n_boot: int = 1000
    rl_epochs: float = 1.0  # RLOO's passes over its prompts (fresh samples on each pass)

    @property
    def budget(self) -> int:
        return self.train_prompts * self.n


QUICK = Plan(32, 4, 2, 20, 1, 0.1, 5e-5, 2e-5, 4, 1, n_boot=400)
FULL = Plan(128, 4, 4, 100, 1, 0.1, 5e-5, 2e-5, 8, 1)


def dpo_config(model_dir: Path, out: Path, plan: Plan, precision: str) -> Config:
    cfg = Config()
    cfg.model.name_or_path = str(model_dir)
    cfg.data.max_length, cfg.data.max_prompt_length = 128, 64  # as run.py
    cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.seed = 8, 1.0, plan.lr, 0
    cfg.loss.beta, cfg.output_dir, cfg.precision = plan.beta, str(out), precision
    return cfg


def snapshot_every(steps: int, plan: Plan) -> int:
    return max(1, math.ceil(steps / (plan.snapshots + 1)))


class Experiment:
    """The task, the held-out evaluation and the judges shared by every method."""

    def __init__(self, plan: Plan, out: Path, reference: Path, cache_dir: str | None, reward_model: Path) -> None:
        self.plan, self.out, self.reward_model_dir = plan, out, reward_model
        self.task = sentiment_task(cache_dir, 75, 20, MAX_NEW_TOKENS, precision="fp32")  # as the committed samples
        pool = prompt_pool()
        self.train_prompts = pool.train[: plan.train_prompts]
        self.eval_prompts = pool.heldout[: plan.eval_prompts]
        self.train_rows = first_k(read_set("pool-train", reference), plan.train_prompts, plan.n)  # the first n each
        have = len({r["prompt_index"] for r in self.train_rows})
        if have < plan.train_prompts:
            raise SystemExit(f"{reference / 'pool-train.jsonl'}: samples for {have} prompts, this run needs "
                             f"{plan.train_prompts}: draw them with run.py --regenerate pool-train")
        self.ref_rewards = by_prompt(read_set("pool-heldout", reference), "score", plan.eval_prompts)  # [P][64]
        self.prompts_file = out / "train_prompts.txt"
        self.use_training_prompts(self.train_prompts)
        self.vader = VaderJudge()
        self._rm: Any = None

    def use_training_prompts(self, prompts: list[str]) -> None:
        """The prompts the on-policy methods sample from (written one a line for ``dpokit online``/``rl``)."""
        self.train_prompts = prompts
        self.prompts_file.write_text("".join(p.replace("\n", " ") + "\n" for p in prompts))

    def reward_model(self) -> Any:
        if self._rm is None:
            from dpokit.eval.judges import RewardModelJudge

            if not (self.reward_model_dir / "config.json").is_file():
                raise SystemExit(f"{self.reward_model_dir}: no reward model: the rm-* methods use the one run.py "
                                 "trains (python examples/sentiment/run.py), or give --reward-model")
            self._rm = RewardModelJudge(str(self.reward_model_dir), batch_size=64)
        return self._rm

    def judge(self, method: str) -> Any:
        return self.reward_model() if method.startswith("rm-") else self.vader

    def evaluate(self, method: str, models: list[tuple[str, Path, int | None]], budgets: list[int]) -> list[Point]:
        points = evaluate_models([(label, path) for label, path, _ in models], self.task.reference,
                                 self.task.tokenizer, self.eval_prompts, self.vader, method=method,
                                 steps=[s for _, _, s in models], n=self.plan.eval_samples, seed=EVAL_SEED,
                                 **self.task.gen)
        for p, b in zip(points, budgets):
            p.info.update({"judge_budget": b, "beta": self.plan.beta})
        return points

    def cached(self, method: str, make: Any) -> list[Point]:
        done = self.out / "runs" / method / "points.json"
        if done.is_file():
            return [Point(**p) for p in json.loads(done.read_text())]
        t0 = time.perf_counter()
        points = make(self.out / "runs" / method)
        for p in points:
            p.info["seconds"] = round(time.perf_counter() - t0)
        done.write_text(json.dumps([p.to_dict() for p in points]))
        return points

    # --------------------------------------------------------------------------------------------- methods
    def offline(self, method: str, run: Path) -> list[Point]:
        """DPO on pairs of the reference's samples: best-worst or RSO, ranked by VADER or by the reward model."""
        from dpokit.train.dpo import run_dpo

        samples = [Sample(r["prompt_index"], [], r["completion_ids"], r["text"]) for r in self.train_rows]
        if method == "rm-dpo":
            scores = self.reward_model().score([self.train_prompts[s.prompt_index] for s in samples],
                                               [s.text for s in samples])
        else:
            scores = [r["score"] for r in self.train_rows]
        pairing = RSO(self.plan.beta, 2) if method == "rso" else BestWorst(1)
        result = pair_scored(samples, scores, self.train_prompts, pairing, seed=0)
        pairs = write_jsonl(self.out / f"pairs-{method}.jsonl", result.records)
        cfg = dpo_config(self.task.model_dir, run, self.plan, self.task.precision)
        cfg.data.train_files = [str(pairs)]
        cfg.train.snapshot_steps = snapshot_every(math.ceil(len(result.records) / cfg.train.batch_size), self.plan)
        run_dpo(cfg, overwrite=True)
        models = run_models(run)
        points = self.evaluate(method, models, [self.plan.budget] * len(models))
        for p in points:
            p.info.update({"pairs": len(result.records), "prompts_without_pair": result.prompts_without_pair})
        shutil.rmtree(run / "snapshots", ignore_errors=True)
        return points

    def online(self, method: str, run: Path) -> list[Point]:
        from dpokit.train.online import OnlineSettings, run_online

        plan = self.plan
        cfg = dpo_config(self.task.model_dir, run, plan, self.task.precision)
        settings = OnlineSettings(prompts=str(self.prompts_file), rounds=plan.rounds,
                                  prompts_per_round=plan.train_prompts // plan.rounds, n=plan.n,
                                  max_new_tokens=MAX_NEW_TOKENS, chat=False, judge={"judge": "vader"})
        res = run_online(cfg, settings, self.vader, overwrite=True)
        models, budgets, total = [], [], 0
        for r in res.rounds:
            total += int(r.get("judge_calls", 0))
            if r.get("trained"):
                models.append((f"round {r['round']}", res.run_dir / r["policy"], r["round"]))
                budgets.append(total)
        points = self.evaluate(method, models, budgets)
        for p, r in zip(points, [r for r in res.rounds if r.get("trained")]):
            p.info.update({"pairs": r.get("pairs"), "prompts_without_pair": r.get("prompts_without_pair"),
                           "implicit_accuracy_before": r.get("implicit_accuracy_before")})
        return points

    def rloo(self, method: str, run: Path) -> list[Point]:
        from dpokit.train.rl import RLSettings, run_rl

        plan = self.plan
        cfg = Config()
        cfg.model.name_or_path = str(self.task.model_dir)
        cfg.data.max_prompt_length = 64
        cfg.train.batch_size, cfg.train.epochs, cfg.train.lr = plan.rl_batch, plan.rl_epochs, plan.rl_lr
        cfg.train.seed, cfg.train.ref_cache = 0, False
        seen = round(plan.train_prompts * plan.rl_epochs)  # prompts sampled over the run
        steps = math.ceil(seen / plan.rl_batch)
        cfg.train.snapshot_steps = snapshot_every(steps, plan)
        cfg.loss.beta, cfg.output_dir, cfg.precision = plan.beta, str(run), self.task.precision
        judge_name = "reward model" if method == "rm-rloo" else "vader"
        settings = RLSettings(prompts=str(self.prompts_file), k=plan.n, max_new_tokens=MAX_NEW_TOKENS, chat=False,
                              judge={"judge": judge_name})
        run_rl(cfg, settings, self.judge(method), overwrite=True)
        models = run_models(run)
        budgets = [min(seen, (s or steps) * plan.rl_batch) * plan.n for _, _, s in models]
        points = self.evaluate(method, models, budgets)
        shutil.rmtree(run / "snapshots", ignore_errors=True)
        return points


# --------------------------------------------------------------------------------------------- the run
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run, under 10 minutes")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    ap.add_argument("--cache-dir", default=None, help="model cache (default: $DPOKIT_CACHE or ~/.cache/dpokit)")
    ap.add_argument("--reference", default=str(REFERENCE), help="directory of the committed reference samples")
    ap.add_argument("--reward-model", default=None,
                    help="the reward model of rm-dpo/rm-rloo (default: run.py's runs/rm/final of the same size)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--prompts", type=int, default=None, help="training prompts P (default: the plan's)")
    ap.add_argument("--replot", action="store_true", help="redraw plot and table from frontier.json")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    if args.prompts:
        plan = replace(plan, train_prompts=args.prompts)
    name = "quick" if args.quick else "full"
    out = Path(args.out) / f"onpolicy-{name}"
    if args.replot:
        result = json.loads((out / "frontier.json").read_text())
        if "pi_star" not in result:
            heldout = by_prompt(read_set("pool-heldout", Path(args.reference)), "score", result["eval_prompts"])
            result["pi_star"] = asdict(ceiling_at_beta(heldout, result["plan"]["beta"]))
        result["run_py"] = _run_py_points(_read_json(Path(args.out) / name / "frontier.json"), result["eval_prompts"])
        (out / "frontier.json").write_text(json.dumps(result, indent=1))
        plot(result, out / "frontier.png")
        (out / "table.md").write_text(table(result))
        print(table(result))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    t0 = time.perf_counter()
    rm_dir = Path(args.reward_model) if args.reward_model else Path(args.out) / name / "runs" / "rm" / "final"
    ex = Experiment(plan, out, Path(args.reference), args.cache_dir, rm_dir)
    points: list[Point] = []
    for m in methods:
        kind = ex.online if m == "online" else ex.rloo if m.endswith("rloo") else ex.offline
        points += ex.cached(m, lambda run, m=m, kind=kind: kind(m, run))
    bon = best_of_n_points(ex.ref_rewards, (1, 2, 4, 8, 16, 32, 64))
    for p in bon:
        p.info["judge_budget"] = p.info["n"] * plan.eval_prompts
    add_efficiency(points + bon, ex.ref_rewards, n_boot=plan.n_boot)
    result = {
        "plan": asdict(plan), "budget": plan.budget, "methods": methods, "precision": ex.task.precision,
        "eval_prompts": plan.eval_prompts, "reference_samples_per_prompt": len(ex.ref_rewards[0]),
        "reference_reward": float(np.mean([np.mean(v) for v in ex.ref_rewards])),
        "points": [p.to_dict() for p in points + bon], "ceiling": ceiling_points(ex.ref_rewards),
        "pi_star": asdict(ceiling_at_beta(ex.ref_rewards, plan.beta)),  # where RLOO(beta) converges
        "run_py": _run_py_points(_read_json(Path(args.out) / name / "frontier.json"), plan.eval_prompts),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "frontier.png")
    (out / "table.md").write_text(table(result))
    print(table(result))
    print(f"\nwall time {result['seconds']:.0f} s; results in {out}")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _run_py_points(frontier: dict | None, eval_prompts: int) -> list[dict]:
    """run.py's DPO/IPO points (its own budget: all its training prompts x 8), when evaluated on the same prompts."""
    if not frontier or frontier.get("eval_prompts") != eval_prompts:
        return []
    budget = frontier["plan"]["train_prompts"] * 8
    out = []
    for p in frontier["points"]:
        if p["method"] in frontier["envelopes"]:
            p = dict(p)
            p["info"] = {**p["info"], "judge_budget": budget}
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------- reporting
def _eff(p: Point) -> str:
    e = p.efficiency or {}
    if not e or not math.isfinite(e.get("efficiency", math.nan)):
        return "—"
    return f"{e['efficiency']:.0%} ± {e['stderr']:.0%}" + (" (beyond the ceiling's KL)" if e.get("beyond_support")
                                                            else "")


def table(result: dict) -> str:
    pts = [Point(**p) for p in result["points"]]
    lines = ["| method | point | judge budget | KL (nats) | mean VADER | efficiency |", "|---|---|---|---|---|---|"]
    for p in pts:
        name = METHODS[p.method][0] if p.method in METHODS else p.method
        lines.append(f"| {name} | {p.label} | {p.info.get('judge_budget', '')} | {p.kl:.3f} ± {p.kl_stderr:.3f} | "
                     f"{p.reward:+.3f} ± {p.reward_stderr:.3f} | {_eff(p)} |")
    lines += ["", f"reference reward {result['reference_reward']:+.3f} on {result['eval_prompts']} held-out prompts; "
                  f"judge budget {result['budget']} samples per method ({result['plan']['train_prompts']} prompts x "
                  f"{result['plan']['n']}); precision {result['precision']}", "",
              "wall time per method (training and evaluating its points, when it ran): " + ", ".join(
                  f"{m} {max(p.info.get('seconds', 0) for p in pts if p.method == m):.0f} s" for m in result["methods"])
              + f"; this invocation {result['seconds']:.0f} s", "",
              "Each method's best point (highest efficiency) and its best reward at KL <= 2 nats:", ""]
    if result.get("pi_star"):
        ps = result["pi_star"]
        lines[-2:-2] = [f"pi*_beta at beta = {ps['beta']:g} (the optimum of E[r] - beta KL, where RLOO(beta) "
                        f"converges; tilted reference samples): KL {ps['kl']:.3f}, reward {ps['reward']:+.3f}", ""]
    for m in result["methods"]:
        mine = [p for p in pts if p.method == m and p.efficiency and math.isfinite(p.efficiency["efficiency"])]
        if not mine:
            lines.append(f"- {METHODS[m][0]}: no point with a positive KL estimate (no efficiency)")
            continue
        best = max(mine, key=lambda p: p.efficiency["efficiency"])
        low = [p for p in mine if p.kl <= 2.0]
        top = max(low, key=lambda p: p.reward) if low else None
        lines.append(f"- {METHODS[m][0]}: best efficiency {_eff(best)} ({best.label}, KL {best.kl:.3f}, reward "
                     f"{best.reward:+.3f})" + (f"; best reward at KL <= 2: {top.reward:+.3f} ± {top.reward_stderr:.3f}"
                                                f" ({top.label}, KL {top.kl:.3f})" if top else ""))
    if result.get("run_py"):
        rp = [Point(**p) for p in result["run_py"]]
        best = max((p for p in rp if p.efficiency and math.isfinite(p.efficiency["efficiency"])),
                   key=lambda p: p.efficiency["efficiency"], default=None)
        if best is not None:
            lines.append(f"- run.py's offline DPO/IPO (judge budget {best.info['judge_budget']}): best efficiency "
                         f"{_eff(best)} ({best.method} {best.label}, KL {best.kl:.3f})")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [Point(**p) for p in result["points"]]
    fig, ax = plt.subplots(figsize=(7.4, 5.0), dpi=120)
    curve = [c for c in result["ceiling"] if math.isfinite(c["kl"])]
    ax.plot([c["kl"] for c in curve], [c["reward"] for c in curve], color="black", lw=1.5,
            label=f"ceiling π*_β (tilting K={result['reference_samples_per_prompt']})")
    if result.get("pi_star"):
        ps = result["pi_star"]
        ax.scatter([ps["kl"]], [ps["reward"]], marker="x", s=40, color="black", zorder=5,
                   label=f"π*_β at β={ps['beta']:g} (RLOO's optimum)")
    bon = sorted((p for p in pts if p.method == "best-of-n"), key=lambda p: p.kl)
    ax.errorbar([p.kl for p in bon], [p.reward for p in bon], yerr=[p.reward_stderr for p in bon], marker="s", ms=4,
                color="tab:gray", capsize=2, lw=1, label="Best-of-N, VADER (tie-aware KL)")
    rp = [Point(**p) for p in result.get("run_py", [])]
    if rp:
        env = upper_envelope(rp)
        ax.scatter([p.kl for p in rp], [p.reward for p in rp], color="tab:purple", s=10, alpha=0.3)
        ax.plot([p.kl for p in env], [p.reward for p in env], color="tab:purple", lw=1, alpha=0.7,
                label=f"run.py DPO/IPO envelope (budget {rp[0].info.get('judge_budget')})")
    for m in result["methods"]:
        mine = sorted((p for p in pts if p.method == m), key=lambda p: p.kl)
        if not mine:
            continue
        legend, color, marker = METHODS[m]
        ax.errorbar([p.kl for p in mine], [p.reward for p in mine], xerr=[p.kl_stderr for p in mine],
                    yerr=[p.reward_stderr for p in mine], fmt=marker, ms=5, color=color, capsize=2, lw=0.8,
                    alpha=0.8, label=legend)
        env = upper_envelope(mine)
        ax.plot([p.kl for p in env], [p.reward for p in env], color=color, lw=1, alpha=0.6)
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence")
    ax.set_ylabel("mean VADER compound sentiment (held-out prompts)")
    ax.set_xlim(left=-0.05)
    ax.set_title(f"Controlled sentiment, SmolLM2-135M: judge budget {result['budget']} samples per method",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
