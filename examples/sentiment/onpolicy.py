"""Offline against on-policy methods on the controlled-sentiment task, at equal judge budget, against the ceiling.

Reference: SmolLM2-135M-Instruct (embedded); reward: VADER compound sentiment of the continuation (the true
reward, the judge of every method). Every method spends the same judge budget B (samples scored):

* offline DPO: B reference samples (``n`` per training prompt), best-worst pairs, DPO;
* DPO on RSO pairs: the same B samples, pairs by statistical rejection sampling at beta_rs = beta;
* online DPO: ``dpokit online``, R rounds of B / R samples from the current policy, best-worst pairs;
* RLOO: ``dpokit rl``, steps of k samples per prompt until B samples are scored, KL penalty beta.

Each policy is evaluated on the held-out prompts (the same seed for every method): mean reward and
KL(policy || reference) from its own samples, per prompt; its efficiency is its reward gain over the reference
divided by the gain of the KL-regularized optimum pi*_beta at the same KL (``dpokit.eval.stats.efficiency``;
the ceiling by exponential tilting of K reference samples per held-out prompt; bootstrap over prompts).
Best-of-N from the same reference samples is drawn for comparison.

    python examples/sentiment/onpolicy.py --quick    # a small run
    python examples/sentiment/onpolicy.py            # the full run

Writes results/onpolicy-{quick,full}/frontier.json and frontier.png and prints a table. What it does not do
(yet): RLOO and DPO against a learned reward model.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dpokit.config import Config
from dpokit.demo import sentiment as vader_scores
from dpokit.demo import sentiment_task
from dpokit.eval.judges import FunctionJudge
from dpokit.eval.pairing import RSO, BestWorst, pair_scored
from dpokit.eval.sampling import sample, score
from dpokit.eval.stats import bon_kl_bound, ceiling_at_kl, efficiency, expected_best_of_n, mean_stderr
from dpokit.models import load_model
from dpokit.train.dpo import run_dpo
from dpokit.train.online import OnlineSettings, run_online
from dpokit.train.rl import RLSettings, run_rl
from dpokit.train.rundir import setup_logging


@dataclass(frozen=True)
class Plan:
    train_prompts: int
    n: int  # samples per training prompt (offline, RSO, online), k for RLOO
    rounds: int  # online rounds: each samples train_prompts / rounds prompts
    eval_prompts: int
    eval_samples: int
    ref_samples: int  # reference samples per held-out prompt: Best-of-N and the ceiling
    beta: float
    epochs: float
    lr: float
    rl_lr: float
    max_new_tokens: int

    @property
    def budget(self) -> int:
        return self.train_prompts * self.n


QUICK = Plan(40, 4, 2, 10, 4, 8, 0.1, 2.0, 2e-5, 1e-5, 24)
FULL = Plan(75, 8, 3, 20, 8, 16, 0.1, 3.0, 2e-5, 1e-5, 32)


def dpo_config(model_dir: Path, out: Path, plan: Plan, precision: str, seed: int) -> Config:
    cfg = Config()
    cfg.model.name_or_path = str(model_dir)
    cfg.data.max_length, cfg.data.max_prompt_length = 128, 64
    cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.seed = 8, plan.epochs, plan.lr, seed
    cfg.loss.beta, cfg.output_dir, cfg.precision = plan.beta, str(out), precision
    return cfg


def evaluate_policy(task: Any, policy: Any, plan: Plan, seed: int) -> tuple[list[float], list[float]]:
    """Per held-out prompt: the mean reward of the policy's samples and their mean log pi/pi_ref (KL estimate)."""
    samples = sample(policy, task.tokenizer, task.eval_prompts, n=plan.eval_samples, seed=seed, **task.gen)
    rewards = vader_scores(task.analyzer, [s.text for s in samples])
    pad = task.tokenizer.pad_token_id
    lp = score(policy, samples, pad_id=pad, device=task.device, precision=task.precision, what="KL: policy")
    lr = score(task.reference, samples, pad_id=pad, device=task.device, precision=task.precision,
               what="KL: reference")
    by_r: dict[int, list[float]] = {}
    by_kl: dict[int, list[float]] = {}
    for s, r, d in zip(samples, rewards, (lp - lr).tolist()):
        by_r.setdefault(s.prompt_index, []).append(r)
        by_kl.setdefault(s.prompt_index, []).append(d)
    keys = sorted(by_r)
    return [sum(by_r[i]) / len(by_r[i]) for i in keys], [sum(by_kl[i]) / len(by_kl[i]) for i in keys]


def point(name: str, rewards: list[float], kls: list[float], ref_by_prompt: list[list[float]], budget: int,
          seconds: float, **extra: Any) -> dict[str, Any]:
    eff = efficiency(rewards, kls, ref_by_prompt, n_boot=1000)
    r, r_se = mean_stderr(rewards)
    kl, kl_se = mean_stderr(kls)
    return {"method": name, "reward": r, "reward_stderr": r_se, "kl": kl, "kl_stderr": kl_se,
            "efficiency": eff.efficiency, "efficiency_stderr": eff.stderr, "efficiency_low": eff.low,
            "efficiency_high": eff.high, "ceiling_reward": eff.ceiling_reward, "beyond_support": eff.beyond_support,
            "judge_budget": budget, "seconds": round(seconds, 1), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results directory")
    ap.add_argument("--cache-dir", default=None, help="model/sample cache (default: ~/.cache/dpokit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", help="auto, bf16 or fp32")
    ap.add_argument("--methods", default="offline,rso,online,rloo", help="comma-separated subset to run")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    out = Path(args.out) / ("onpolicy-quick" if args.quick else "onpolicy-full")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    t0 = time.perf_counter()
    task = sentiment_task(args.cache_dir, plan.train_prompts, plan.eval_prompts, plan.max_new_tokens,
                          precision=args.precision)
    eval_seed = args.seed + 1
    judge = FunctionJudge(lambda p, c: vader_scores(task.analyzer, [c])[0], "vader")

    # the reference on the held-out prompts: its reward, Best-of-N and the ceiling pi*_beta
    ref_samples, ref_scores = task.reference_samples(task.eval_prompts, plan.ref_samples, eval_seed,
                                                     "onpolicy-ref")
    by_prompt: dict[int, list[float]] = {}
    for s, sc in zip(ref_samples, ref_scores):
        by_prompt.setdefault(s.prompt_index, []).append(sc)
    ref_by_prompt = [by_prompt[i] for i in sorted(by_prompt)]
    points: list[dict[str, Any]] = []
    n = 1
    while n <= plan.ref_samples:
        m, se = mean_stderr([expected_best_of_n(v, n) for v in ref_by_prompt])
        points.append({"method": "best-of-n", "n": n, "reward": m, "reward_stderr": se, "kl": bon_kl_bound(n),
                       "judge_budget": n * plan.eval_prompts})
        n *= 2
    ceiling = [asdict(ceiling_at_kl(ref_by_prompt, kl)) for kl in (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)]

    # B reference samples on the training prompts: offline DPO and RSO pairs
    methods = args.methods.split(",")
    train_file = out / "train_prompts.txt"
    train_file.write_text("".join(p.replace("\n", " ") + "\n" for p in task.train_prompts))
    if {"offline", "rso"} & set(methods):
        tr_samples, tr_scores = task.reference_samples(task.train_prompts, plan.n, args.seed, "train-samples")
    for name, pairing in (("offline", BestWorst(1)), ("rso", RSO(plan.beta, 2))):
        if name not in methods:
            continue
        t = time.perf_counter()
        result = pair_scored(tr_samples, tr_scores, task.train_prompts, pairing, seed=args.seed)
        pairs = out / f"pairs-{name}.jsonl"
        pairs.write_text("".join(json.dumps(r) + "\n" for r in result.records))
        cfg = dpo_config(task.model_dir, out / "runs" / name, plan, task.precision, args.seed)
        cfg.data.train_files = [str(pairs)]
        final = run_dpo(cfg, overwrite=True)
        policy = load_model(str(final)).to(task.device).eval()
        rewards, kls = evaluate_policy(task, policy, plan, eval_seed)
        points.append(point(f"DPO ({name} pairs)" if name == "rso" else "DPO (offline)", rewards, kls, ref_by_prompt,
                            plan.budget, time.perf_counter() - t, pairs=len(result.records),
                            prompts_without_pair=result.prompts_without_pair))
        del policy

    if "online" in methods:
        t = time.perf_counter()
        cfg = dpo_config(task.model_dir, out / "runs" / "online", plan, task.precision, args.seed)
        settings = OnlineSettings(prompts=str(train_file), rounds=plan.rounds,
                                  prompts_per_round=plan.train_prompts // plan.rounds, n=plan.n,
                                  max_new_tokens=plan.max_new_tokens, eval_samples=1, chat=False,
                                  judge={"judge": "vader"})
        res = run_online(cfg, settings, judge, overwrite=True)
        budget = sum(int(r.get("judge_calls", 0)) for r in res.rounds)
        policy = load_model(str(res.final)).to(task.device).eval()
        rewards, kls = evaluate_policy(task, policy, plan, eval_seed)
        points.append(point("DPO (online)", rewards, kls, ref_by_prompt, budget, time.perf_counter() - t,
                            pairs=sum(int(r.get("pairs", 0)) for r in res.rounds)))
        del policy

    if "rloo" in methods:
        t = time.perf_counter()
        cfg = Config()
        cfg.model.name_or_path = str(task.model_dir)
        cfg.data.max_prompt_length = 64
        cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.seed = 4, 1.0, plan.rl_lr, args.seed
        cfg.train.ref_cache = False
        cfg.loss.beta, cfg.output_dir, cfg.precision = plan.beta, str(out / "runs" / "rloo"), task.precision
        rl = RLSettings(prompts=str(train_file), k=plan.n, max_new_tokens=plan.max_new_tokens, chat=False,
                        judge={"judge": "vader"})
        final = run_rl(cfg, rl, judge, overwrite=True)
        policy = load_model(str(final)).to(task.device).eval()
        rewards, kls = evaluate_policy(task, policy, plan, eval_seed)
        points.append(point("RLOO", rewards, kls, ref_by_prompt, plan.budget, time.perf_counter() - t))
        del policy

    ref_reward, ref_se = mean_stderr([sum(v) / len(v) for v in ref_by_prompt])
    result = {"plan": asdict(plan), "seed": args.seed, "precision": task.precision,
              "reference_reward": ref_reward, "reference_reward_stderr": ref_se, "ceiling": ceiling,
              "points": points, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "frontier.png")
    print(table(result))
    print(f"\nwall time {result['seconds']:.0f} s; results in {out}")


def table(result: dict[str, Any]) -> str:
    lines = [f"reference reward {result['reference_reward']:.3f} ± {result['reference_reward_stderr']:.3f}",
             "| method | judge budget | reward | KL (nats) | efficiency (95% CI) | seconds |",
             "|---|---|---|---|---|---|"]
    for p in result["points"]:
        if p["method"] == "best-of-n":
            lines.append(f"| Best-of-{p['n']} | {p['judge_budget']} | {p['reward']:.3f} ± {p['reward_stderr']:.3f} | "
                         f"{p['kl']:.2f} | - | - |")
        else:
            lines.append(f"| {p['method']} | {p['judge_budget']} | {p['reward']:.3f} ± {p['reward_stderr']:.3f} | "
                         f"{p['kl']:.2f} ± {p['kl_stderr']:.2f} | {p['efficiency']:.2f} ({p['efficiency_low']:.2f} "
                         f"to {p['efficiency_high']:.2f}) | {p['seconds']:.0f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    c = result["ceiling"]
    ax.plot([0.0] + [p["kl"] for p in c], [result["reference_reward"]] + [p["reward"] for p in c], color="black",
            label="ceiling π*_β (tilted reference samples)")
    bon = [p for p in result["points"] if p["method"] == "best-of-n"]
    ax.errorbar([p["kl"] for p in bon], [p["reward"] for p in bon], yerr=[p["reward_stderr"] for p in bon],
                marker="s", color="tab:gray", label="Best-of-N", capsize=3)
    for p, color in zip([p for p in result["points"] if p["method"] != "best-of-n"],
                        ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")):
        ax.errorbar([p["kl"]], [p["reward"]], xerr=[p["kl_stderr"]], yerr=[p["reward_stderr"]], fmt="o",
                    color=color, capsize=3, label=f"{p['method']} (eff. {p['efficiency']:.2f})")
    ax.set_xlabel("KL(policy ‖ reference), nats per sequence")
    ax.set_ylabel("mean VADER compound sentiment")
    ax.set_title("Controlled sentiment, SmolLM2-135M: equal judge budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
