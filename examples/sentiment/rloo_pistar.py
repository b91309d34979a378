"""RLOO(beta) against pi*_beta on the controlled-sentiment task: does RL land where the KL-regularized optimum is?

RLOO maximizes J(pi) = E[r] - beta * KL(pi || pi_ref), whose maximizer is
pi*_beta(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta) (the DPO paper's eq. 4). ``onpolicy.py``'s equal-budget RLOO
stops far from pi*_0.1 (KL 1.8 nats away); here RLOO runs at a beta whose optimum is near enough to reach, over as
many prompts as asked, and each of its points (snapshots and the final model) is compared with pi*_beta estimated
by tilting the 64 committed reference samples of each held-out prompt: the differences in KL, reward and J, each
in units of its standard error (the point's, and pi*'s own from a bootstrap over held-out prompts). The set-up,
the evaluation and the reference samples are ``onpolicy.py``'s.

    python examples/sentiment/rloo_pistar.py                 # beta 0.5, all 525 training prompts x 4, lr 2e-5
    python examples/sentiment/rloo_pistar.py --quick         # 32 prompts, 20 held-out: a smoke run
    python examples/sentiment/rloo_pistar.py --beta 1 --prompts 256
    python examples/sentiment/rloo_pistar.py --k 8 --prompts 256 --name rloo-pistar-k8   # the same budget, k = 8
    python examples/sentiment/rloo_pistar.py --train-on-heldout --epochs 10 --name rloo-pistar-heldout

Writes ``results/rloo-pistar-{full,quick}/`` (``result.json``, ``table.md``); the run's points are kept in
``runs/rloo/points.json`` and not recomputed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from onpolicy import FULL, HERE, QUICK, Experiment  # noqa: E402
from run import REFERENCE  # noqa: E402

from dpokit.eval.frontier import Point  # noqa: E402
from dpokit.eval.stats import ceiling_at_beta, mean_stderr  # noqa: E402
from dpokit.train.rundir import setup_logging  # noqa: E402


def pistar_with_stderr(ref_rewards: list[list[float]], beta: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """pi*_beta's (KL, reward, J = reward - beta KL) from tilted reference samples [P][K], each with its standard
    error from resampling the held-out prompts."""
    star = ceiling_at_beta(ref_rewards, beta)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(ref_rewards), len(ref_rewards))
        c = ceiling_at_beta([ref_rewards[i] for i in idx], beta)
        boot.append((c.kl, c.reward))
    kl_se, reward_se = np.std(np.array(boot), axis=0, ddof=1)
    j_se = float(np.std([r - beta * k for k, r in boot], ddof=1))
    return {"beta": beta, "kl": star.kl, "reward": star.reward, "objective": star.reward - beta * star.kl,
            "kl_stderr": float(kl_se), "reward_stderr": float(reward_se), "objective_stderr": j_se}


def compare(point: Point, star: dict) -> dict:
    """The point against pi*_beta: differences (point - pi*) and their z-scores, the two estimates' errors taken as
    independent (the point's samples are fresh; pi*'s are the committed reference samples). The point's J and its
    error come from its per-prompt values r_i - beta k_i, so the correlation of reward and KL is counted."""
    beta = star["beta"]
    j, j_se = mean_stderr([r - beta * k for r, k in zip(point.prompt_rewards, point.prompt_kls)])
    out = {"label": point.label, "judge_budget": point.info.get("judge_budget"), "kl": point.kl,
           "kl_stderr": point.kl_stderr, "reward": point.reward, "reward_stderr": point.reward_stderr,
           "objective": j, "objective_stderr": j_se}
    for key, se in (("kl", point.kl_stderr), ("reward", point.reward_stderr), ("objective", j_se)):
        diff = out[key] - star[key]
        out[f"{key}_diff"] = diff
        out[f"{key}_z"] = diff / math.hypot(se, star[f"{key}_stderr"])
    return out


def comparison_rows(comparisons: list[dict], what: str) -> list[str]:
    """A markdown table of ``compare``'s results, a row per point."""
    lines = [f"| {what} | judge budget | KL (nats) | mean VADER | J | KL − π* (z) | reward − π* (z) | J − π* (z) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['label']} | {c['judge_budget']} | {c['kl']:.3f} ± {c['kl_stderr']:.3f} | "
                     f"{c['reward']:+.3f} ± {c['reward_stderr']:.3f} | {c['objective']:+.3f} ± "
                     f"{c['objective_stderr']:.3f} | {c['kl_diff']:+.3f} ({c['kl_z']:+.1f}) | {c['reward_diff']:+.3f} "
                     f"({c['reward_z']:+.1f}) | {c['objective_diff']:+.3f} ({c['objective_z']:+.1f}) |")
    return lines


def table(result: dict) -> str:
    s = result["pi_star"]
    lines = [f"pi*_beta at beta = {s['beta']:g} (tilted reference samples, {result['eval_prompts']} held-out prompts "
             f"x {result['reference_samples_per_prompt']}): KL {s['kl']:.3f} ± {s['kl_stderr']:.3f}, reward "
             f"{s['reward']:+.3f} ± {s['reward_stderr']:.3f}, J = reward - beta KL {s['objective']:+.3f} ± "
             f"{s['objective_stderr']:.3f}; reference reward {result['reference_reward']:+.3f}", "",
             ] + comparison_rows(result["comparisons"], "RLOO point")
    p = result["plan"]
    passes = p.get("rl_epochs", 1.0)
    on = " (the held-out prompts themselves)" if result.get("trained_on") == "held-out" else ""
    lines += ["", f"RLOO: beta {p['beta']:g}, {p['train_prompts']} prompts{on} x k = {p['n']}"
              + (f", {passes:g} passes" if passes != 1 else "")
              + f", {p['rl_batch']} prompts per step, lr {p['rl_lr']:g} (warm-up 10%, then linear decay), precision "
              f"{result['precision']}; {result['seconds']:.0f} s this invocation"]
    return "\n".join(lines) + "\n"


def arguments(doc: str, name: str, snapshots: int) -> argparse.ArgumentParser:
    """The options every pi* comparison script takes."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 prompts, 20 held-out prompts: a smoke run")
    ap.add_argument("--prompts", type=int, default=None, help="training prompts (default: 525, or 32 with --quick)")
    ap.add_argument("--snapshots", type=int, default=snapshots, help="snapshots along the run (the final model is "
                    "one more)")
    ap.add_argument("--name", default=None, help=f"results subdirectory (default: {name}-full or -quick)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    ap.add_argument("--cache-dir", default=None, help="model cache (default: $DPOKIT_CACHE or ~/.cache/dpokit)")
    ap.add_argument("--reference", default=str(REFERENCE), help="directory of the committed reference samples")
    return ap


def main() -> None:
    ap = arguments(__doc__, "rloo-pistar", snapshots=3)
    ap.add_argument("--beta", type=float, default=0.5, help="RLOO's KL penalty, and the pi*_beta it is compared to")
    ap.add_argument("--lr", type=float, default=None, help="RLOO's peak learning rate (default: onpolicy.py's)")
    ap.add_argument("--k", type=int, default=None, help="samples per prompt (default: onpolicy.py's 4)")
    ap.add_argument("--batch", type=int, default=None, help="prompts per step (default: onpolicy.py's 8)")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the prompts, fresh samples on each")
    ap.add_argument("--train-on-heldout", action="store_true", help="train on the held-out prompts themselves: "
                    "pi*_beta is defined prompt by prompt, so this leaves out generalizing to unseen prompts")
    args = ap.parse_args()
    base = QUICK if args.quick else FULL
    if args.train_on_heldout and args.prompts:
        ap.error("--train-on-heldout trains on the evaluation prompts; --prompts does not apply")
    n_train = base.eval_prompts if args.train_on_heldout else args.prompts or (32 if args.quick else 525)
    plan = replace(base, beta=args.beta, train_prompts=n_train,
                   rl_lr=args.lr or base.rl_lr, snapshots=args.snapshots, n=args.k or base.n,
                   rl_batch=args.batch or base.rl_batch, rl_epochs=args.epochs)
    out = Path(args.out) / (args.name or f"rloo-pistar-{'quick' if args.quick else 'full'}")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    t0 = time.perf_counter()
    ex = Experiment(plan, out, Path(args.reference), args.cache_dir, reward_model=out / "unused")
    if args.train_on_heldout:
        ex.use_training_prompts(ex.eval_prompts)
    points = ex.cached("rloo", lambda run: ex.rloo("rloo", run))
    star = pistar_with_stderr(ex.ref_rewards, plan.beta)
    result = {"plan": asdict(plan), "trained_on": "held-out" if args.train_on_heldout else "training",
              "precision": ex.task.precision, "eval_prompts": plan.eval_prompts,
              "reference_samples_per_prompt": len(ex.ref_rewards[0]),
              "reference_reward": float(np.mean([np.mean(v) for v in ex.ref_rewards])), "pi_star": star,
              "points": [p.to_dict() for p in points], "comparisons": [compare(p, star) for p in points],
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
