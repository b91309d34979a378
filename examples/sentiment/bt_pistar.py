"""DPO on Bradley-Terry labels against pi*_{tau beta} on the controlled-sentiment task: does DPO land where the theory
says?

Labels drawn from a Bradley-Terry model at temperature tau, P(a beats b) = sigma((r_a - r_b) / tau), are the
labels of the reward r / tau. DPO at beta fits beta * log(pi / pi_ref) to the labels' reward, so on pairs drawn from
pi_ref its minimizer is pi ∝ pi_ref exp(r / (tau beta)) = pi*_{tau beta} (the DPO paper's eq. 4 with r / tau for r).
Here the pairs are the committed reference samples of the training prompts (8 per prompt, paired as drawn: 4
random pairs per prompt), each labelled by ``dpokit.eval.pairing.BradleyTerry(tau)`` on its VADER scores; DPO at
beta trains one epoch on them with snapshots, and every point (snapshots and the final model, on the held-out
prompts) is compared with pi*_{tau beta} estimated by tilting the 64 reference samples of each held-out prompt,
and with pi*_beta (the optimum if tau were ignored): differences in KL, reward and J = reward - tau beta KL, in
units of their standard errors (``rloo_pistar.compare``).

    python examples/sentiment/bt_pistar.py                    # beta 1, tau 0.5: targets pi*_0.5 (as rloo_pistar.py)
    python examples/sentiment/bt_pistar.py --quick            # 32 prompts, 20 held-out: a smoke run
    python examples/sentiment/bt_pistar.py --beta 0.5 --tau 1 --name bt-pistar-b0.5

Writes ``results/bt-pistar-{full,quick}/`` (``pairs.jsonl``, ``result.json``, ``table.md``); the run's points are
kept in ``runs/NAME/points.json`` and not recomputed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from rloo_pistar import arguments, compare, comparison_rows, pistar_with_stderr  # noqa: E402
from run import (  # noqa: E402
    FULL,
    MAX_NEW_TOKENS,
    Variant,
    by_prompt,
    read_set,
    train_and_evaluate,
    write_jsonl,
)

from dpokit.demo import prompt_pool, sentiment_task  # noqa: E402
from dpokit.eval.frontier import Point  # noqa: E402
from dpokit.eval.pairing import BradleyTerry, pair_scored  # noqa: E402
from dpokit.eval.sampling import Sample  # noqa: E402
from dpokit.eval.stats import efficiency  # noqa: E402
from dpokit.train.rundir import setup_logging  # noqa: E402

N_BOOT = 1000  # bootstrap resamples of each point's efficiency


def bt_pairs(rows: list[dict], prompts: list[str], tau: float, seed: int = 0) -> tuple[list[dict], dict]:
    """Every training prompt's reference samples (prompt_index < len(prompts)) paired as drawn, each pair's winner
    drawn by ``BradleyTerry(tau)`` on the samples' scores; returns the records and what the pairing left out and how
    often the label agrees with the scores' order."""
    kept = [r for r in rows if r["prompt_index"] < len(prompts)]
    samples = [Sample(r["prompt_index"], [], r["completion_ids"], r["text"]) for r in kept]
    result = pair_scored(samples, [r["score"] for r in kept], prompts, BradleyTerry(tau), seed=seed)
    recs = result.records
    decided = [r for r in recs if r["chosen_score"] != r["rejected_score"]]
    stats = {"pairs": len(recs), "prompts_without_pair": result.prompts_without_pair,
             "left_out": dict(result.dropped), "tied_scores": len(recs) - len(decided),
             "label_agrees_with_scores": sum(r["chosen_score"] > r["rejected_score"] for r in decided) / len(decided),
             "expected_agreement": float(np.mean([1 / (1 + np.exp(-abs(r["chosen_score"] - r["rejected_score"]) / tau))
                                                  for r in decided]))}
    return recs, stats


def table(result: dict) -> str:
    p, lines = result["plan"], []
    for key, what in (("pi_star", "pi*_{tau beta}, the theory's target"), ("pi_star_beta", "pi*_beta, tau ignored")):
        s = result[key]
        lines += [f"{what}: pi* at {s['beta']:g} (tilted reference samples, {result['eval_prompts']} held-out prompts "
                  f"x {result['reference_samples_per_prompt']}): KL {s['kl']:.3f} ± {s['kl_stderr']:.3f}, reward "
                  f"{s['reward']:+.3f} ± {s['reward_stderr']:.3f}, J {s['objective']:+.3f} ± "
                  f"{s['objective_stderr']:.3f}",
                  ""] + comparison_rows(result[f"comparisons_{key}"], "DPO point") + [""]
    eff = ", ".join(f"{p['label']} {p['efficiency']['efficiency']:.0%} ± {p['efficiency']['stderr']:.0%}"
                    for p in result["points"])
    lines += [f"efficiency (reward gain over the ceiling's at the point's KL): {eff}", ""]
    pr = result["pairs"]
    lines += [f"DPO: beta {p['beta']:g} on Bradley-Terry labels at tau {p['tau']:g}; {pr['pairs']} pairs from "
              f"{p['train_prompts']} prompts x 8 reference samples ({pr['tied_scores']} with tied scores, labelled by "
              f"a coin; the label agrees with VADER's order on {pr['label_agrees_with_scores']:.3f} of the rest, "
              f"{pr['expected_agreement']:.3f} expected), one epoch, batch {p['batch_size']}, lr {p['lr']:g}, "
              f"precision {result['precision']}; reference reward {result['reference_reward']:+.3f}; training "
              f"{result['points'][-1]['info']['train_seconds']} s, {result['seconds']:.0f} s this invocation"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = arguments(__doc__, "bt-pistar", snapshots=4)
    ap.add_argument("--beta", type=float, default=1.0, help="DPO's beta")
    ap.add_argument("--tau", type=float, default=0.5, help="the Bradley-Terry labels' temperature")
    ap.add_argument("--lr", type=float, default=2e-5, help="DPO's peak learning rate")
    args = ap.parse_args()
    n_train, n_eval = (args.prompts or (32 if args.quick else 525)), (20 if args.quick else 100)
    v = Variant("sigmoid", args.beta, args.lr)
    plan = replace(FULL, train_prompts=n_train, eval_prompts=n_eval, variants=(v,), snapshots=args.snapshots)
    out = Path(args.out) / (args.name or f"bt-pistar-{'quick' if args.quick else 'full'}")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    t0 = time.perf_counter()
    reference = Path(args.reference)
    task = sentiment_task(args.cache_dir, 75, 20, MAX_NEW_TOKENS, precision="fp32")  # as the reference samples
    pool = prompt_pool()
    train_prompts, eval_prompts = pool.train[:n_train], pool.heldout[:n_eval]
    records, pair_stats = bt_pairs(read_set("pool-train", reference), train_prompts, args.tau)
    pairs_path = write_jsonl(out / "pairs.jsonl", records)
    points: list[Point] = train_and_evaluate(v, task, pairs_path, len(records), plan, out, eval_prompts, False)
    for p in points:  # samples scored behind the point: 2 per pair trained on so far
        p.info["judge_budget"] = 2 * min(len(records), p.step * plan.batch_size if p.step else len(records))
    ref_rewards = by_prompt(read_set("pool-heldout", reference), "score", n_eval)
    star, star_beta = pistar_with_stderr(ref_rewards, args.tau * args.beta), pistar_with_stderr(ref_rewards, args.beta)
    for p in points:  # against the ceiling at the point's own KL, as run.py's table
        p.efficiency = efficiency(p.prompt_rewards, p.prompt_kls, ref_rewards, n_boot=N_BOOT).to_dict()
    result = {"plan": {**asdict(plan), "beta": args.beta, "tau": args.tau, "lr": args.lr}, "precision": task.precision,
              "eval_prompts": n_eval, "reference_samples_per_prompt": len(ref_rewards[0]),
              "reference_reward": float(np.mean([np.mean(r) for r in ref_rewards])), "pairs": pair_stats,
              "pi_star": star, "pi_star_beta": star_beta, "points": [p.to_dict() for p in points],
              "comparisons_pi_star": [compare(p, star) for p in points],
              "comparisons_pi_star_beta": [compare(p, star_beta) for p in points],
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
