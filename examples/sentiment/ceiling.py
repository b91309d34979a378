"""How close is Best-of-N to the KL-regularized optimum? Both on the reference samples of the sentiment task.

The reference samples are those ``run.py`` draws (``dpokit.demo.SentimentTask.reference_samples``: same
model, prompts, seeds and settings), committed under ``results/reference/`` as JSONL
(prompt_index, text, score):

* ``bon-ref.jsonl``: 16 samples for each of the 20 held-out openings (seed 1): the README's Best-of-N;
* ``train-samples.jsonl``: 8 samples for each of the 75 training openings (seed 0): the on-policy pairs;
* ``k64-ref.jsonl``: 64 samples for each of the first 10 held-out openings (seed 2, fp32): the ceiling's K.

``provenance.json`` beside them records how each set was drawn (precision, versions, CPU, cache key).

From them this script prints and writes ``results/ceiling/ceiling.json`` and ``ceiling.png``:

1. the README's Best-of-N table (unbiased reward from K = 16, at KL = log N - (N-1)/N);
2. Best-of-N's KL with ties: exact over the 16 empirical samples (``best_of_n_empirical``), and the
   population estimate keeping tied values as atoms (``bon_kl_ties``);
3. the ceiling pi*_beta (exponential tilting of the 16 samples) against Best-of-N at KL 0.2 ... 1.8;
4. the ceiling from K = 16 against K = 64 on 10 prompts.

    python examples/sentiment/ceiling.py                 # from the committed samples (seconds)
    python examples/sentiment/ceiling.py --regenerate    # draw all three sets again (about 1-2 hours on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import numpy as np

from dpokit.eval.stats import (
    best_of_n_empirical,
    bon_kl_bound,
    bon_kl_ties,
    ceiling_at_kl,
    ceiling_by_k,
    ceiling_curve,
    ceiling_max_kl,
    efficiency,
    expected_best_of_n,
    mean_stderr,
)

HERE = Path(__file__).parent
REFERENCE = HERE / "results" / "reference"
# (openings, how many, samples per opening, seed, precision); the first two as run.py's FULL plan and the
# README's run (bf16); k64-ref in fp32, which runs 2-3x faster than bf16 on a CPU without AVX512-BF16
SETS = {
    "train-samples": ("train", 75, 8, 0, "bf16"),
    "bon-ref": ("heldout", 20, 16, 1, "bf16"),
    "k64-ref": ("heldout", 10, 64, 2, "fp32"),
}
BON_NS = (1, 2, 4, 8, 16)
KL_GRID = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8)


def load(name: str, reference: Path = REFERENCE) -> dict[int, list[float]]:
    """Committed samples -> rewards per prompt index (in sample order)."""
    by_prompt: dict[int, list[float]] = {}
    for ln in (reference / f"{name}.jsonl").read_text().splitlines():
        rec = json.loads(ln)
        by_prompt.setdefault(int(rec["prompt_index"]), []).append(float(rec["score"]))
    return by_prompt


def bon_table(by_prompt: dict[int, list[float]]) -> list[dict]:
    """The README's Best-of-N rows: unbiased E[max of N] (mean ± s.e. over prompts) at the analytic KL."""
    rows = []
    for n in BON_NS:
        m, se = mean_stderr([expected_best_of_n(v, n) for v in by_prompt.values()])
        rows.append({"n": n, "kl": bon_kl_bound(n), "reward": m, "reward_stderr": se})
    return rows


def bon_row(rewards: list[list[float]], n: int) -> dict:
    """Best-of-n three ways (exact over the samples; unbiased reward at the analytic and tie-aware KL) and
    the ceiling from the same samples at the exact KL."""
    per = [best_of_n_empirical(v, n) for v in rewards]
    kl, reward = float(np.mean([p[0] for p in per])), float(np.mean([p[1] for p in per]))
    c = ceiling_at_kl(rewards, kl)
    unbiased = float(np.mean([expected_best_of_n(v, n) for v in rewards])) if n <= min(map(len, rewards)) else None
    return {"n": n, "kl_exact_empirical": kl, "reward_empirical": reward, "kl_analytic": bon_kl_bound(n),
            "kl_ties_population": float(np.mean([bon_kl_ties(v, n) for v in rewards])),
            "reward_unbiased": unbiased, "ceiling_at_kl_exact": c.reward, "gap_at_kl_exact": c.reward - reward,
            "ceiling_at_kl_analytic": ceiling_at_kl(rewards, bon_kl_bound(n)).reward}


def analyse(reference: Path = REFERENCE) -> dict:
    bon = load("bon-ref", reference)
    rewards = list(bon.values())
    scores = [x for v in rewards for x in v]
    result: dict = {
        "samples": len(scores), "prompts": len(rewards), "zero_share": sum(x == 0 for x in scores) / len(scores),
        "readme_table": bon_table(bon),
        "ceiling_max_kl": ceiling_max_kl(rewards),
    }
    exact = [bon_row(rewards, n) for n in range(1, 21)]  # n > K is fine with replacement; unbiased needs n <= K
    result["best_of_n"] = exact

    # the ceiling against Best-of-N on a KL grid; Best-of-N interpolated linearly in KL between its N
    def bon_at(kl: float, kl_key: str, reward_key: str) -> float:
        pts = sorted((e[kl_key], e[reward_key]) for e in exact if e[reward_key] is not None)
        return float(np.interp(kl, [p[0] for p in pts], [p[1] for p in pts], left=np.nan, right=np.nan))

    grid = []
    for kl in KL_GRID:
        c = ceiling_at_kl(rewards, kl)
        row = {"kl": kl, "beta": c.beta, "ceiling": c.reward,
               "bon_exact_empirical": bon_at(kl, "kl_exact_empirical", "reward_empirical"),
               "bon_unbiased_at_analytic_kl": bon_at(kl, "kl_analytic", "reward_unbiased"),
               "bon_unbiased_at_ties_kl": bon_at(kl, "kl_ties_population", "reward_unbiased")}
        for k in ("bon_exact_empirical", "bon_unbiased_at_analytic_kl", "bon_unbiased_at_ties_kl"):
            row["gap_" + k] = row["ceiling"] - row[k]
        grid.append(row)
    result["ceiling_vs_bon"] = grid
    betas = [0.0] + list(np.geomspace(0.01, 10, 61)) + [math.inf]
    result["ceiling_curve"] = [{"beta": p.beta, "kl": p.kl, "reward": p.reward} for p in ceiling_curve(rewards, betas)]

    # the README's DPO/IPO points (only their means were kept: a point estimate, no standard error)
    frontier = HERE / "results" / "earlier" / "frontier.json"  # the earlier set-up
    if frontier.is_file():
        pts = [p for p in json.loads(frontier.read_text())["points"] if p["method"] != "best-of-n"]
        result["readme_points_efficiency"] = [
            {"label": p["label"], "kl": p["kl"], "reward": p["reward"],
             **{k: v for k, v in efficiency([p["reward"]] * len(rewards), [p["kl"]] * len(rewards), rewards,
                                            n_boot=0).to_dict().items()
                if k in ("efficiency", "ceiling_reward", "reference_reward", "beyond_support")}}
            for p in pts]

    k64 = load("k64-ref", reference)
    r64 = np.array(list(k64.values()))
    kls = [x for x in KL_GRID if x < ceiling_max_kl(r64[:, :16]) and x < ceiling_max_kl(r64)]
    by16, by64 = ceiling_by_k(r64, 16, kls), ceiling_by_k(r64, 64, kls)[0]
    result["k_dependence"] = {
        "prompts": int(r64.shape[0]), "k": 64, "kls": kls,
        "ceiling_k64": by64.tolist(), "ceiling_k16_mean": by16.mean(0).tolist(),
        "ceiling_k16_replicates": by16.tolist(),
        "ceiling_k16_replicate_sd": by16.std(0, ddof=1).tolist(),
        "best_of_n_k64": [bon_row(r64.tolist(), n) for n in BON_NS],
        "plot_kls": (plot_kls := np.linspace(0.0, 2.6, 53).tolist()),
        "plot_ceiling_k64": ceiling_by_k(r64, 64, plot_kls)[0].tolist(),
        "plot_ceiling_k16_mean": ceiling_by_k(r64, 16, plot_kls).mean(0).tolist(),
        "ceiling_k16_mean_at_bon_kl": ceiling_by_k(r64, 16, [bon_kl_bound(n) for n in BON_NS]).mean(0).tolist(),
        "max_kl_k16": [ceiling_max_kl(r64[:, j * 16 : (j + 1) * 16]) for j in range(4)],
        "max_kl_k64": ceiling_max_kl(r64),
    }
    return result


def report(res: dict) -> str:
    out = [f"{res['samples']} reference samples on {res['prompts']} held-out prompts; "
           f"{res['zero_share']:.1%} score exactly 0", "",
           "Best-of-N as in the README (unbiased reward from K=16, analytic KL):",
           f"{'N':>4} {'KL':>6} {'reward':>16}"]
    for r in res["readme_table"]:
        out.append(f"{r['n']:>4} {r['kl']:>6.2f} {r['reward']:>+9.3f} ± {r['reward_stderr']:.3f}")
    out += ["", "Best-of-N's KL with ties; reward of Best-of-N over the 16 empirical samples; the ceiling at that KL:",
            f"{'N':>4} {'analytic':>9} {'ties(pop)':>10} {'exact(emp)':>11} {'reward(emp)':>12} "
            f"{'unbiased':>9} {'ceiling':>8} {'gap':>7}"]
    for e in res["best_of_n"]:
        if e["n"] in BON_NS + (20,):
            unbiased = "" if e["reward_unbiased"] is None else f"{e['reward_unbiased']:+.3f}"
            out.append(f"{e['n']:>4} {e['kl_analytic']:>9.3f} {e['kl_ties_population']:>10.3f} "
                       f"{e['kl_exact_empirical']:>11.3f} {e['reward_empirical']:>+12.3f} {unbiased:>9} "
                       f"{e['ceiling_at_kl_exact']:>+8.3f} {e['gap_at_kl_exact']:>+7.3f}")
    out += ["", f"Ceiling (tilting, K=16) minus Best-of-N at equal KL "
                f"(largest ceiling KL {res['ceiling_max_kl']:.2f}):",
            f"{'KL':>5} {'beta':>7} {'ceiling':>8} {'- BoN exact emp.':>17} {'- BoN unb. @analytic':>21} "
            f"{'- BoN unb. @ties':>17}"]
    for g in res["ceiling_vs_bon"]:
        out.append(f"{g['kl']:>5.1f} {g['beta']:>7.3f} {g['ceiling']:>+8.3f} {g['gap_bon_exact_empirical']:>+17.3f} "
                   f"{g['gap_bon_unbiased_at_analytic_kl']:>+21.3f} {g['gap_bon_unbiased_at_ties_kl']:>+17.3f}")
    if "readme_points_efficiency" in res:
        out += ["", "The README's DPO/IPO points against this ceiling (K=16; point estimates, no s.e.):"]
        for p in res["readme_points_efficiency"]:
            out.append(f"  {p['label']:<14} KL {p['kl']:.2f}  reward {p['reward']:+.3f}  ceiling "
                       f"{p['ceiling_reward']:+.3f}  efficiency {p['efficiency']:.0%}")
    kd = res["k_dependence"]
    out += ["", f"Ceiling from K=16 (mean of 4 disjoint replicates ± sd) against K=64, {kd['prompts']} prompts:",
            f"{'KL':>5} {'K=16':>16} {'K=64':>8} {'diff':>7}"]
    for kl, a, sd, b in zip(kd["kls"], kd["ceiling_k16_mean"], kd["ceiling_k16_replicate_sd"], kd["ceiling_k64"]):
        out.append(f"{kl:>5.1f} {a:>+9.3f} ± {sd:.3f} {b:>+8.3f} {b - a:>+7.3f}")
    out.append(f"largest KL: K=16 {np.mean(kd['max_kl_k16']):.2f} (mean of replicates), K=64 {kd['max_kl_k64']:.2f}")
    out += ["", f"Same {kd['prompts']} prompts: Best-of-N's unbiased reward (K=64) at log N - (N-1)/N against the "
            "ceiling there:", f"{'N':>4} {'KL':>6} {'BoN':>8} {'ceil K=16':>10} {'ceil K=64':>10}"]
    for e, c16 in zip(kd["best_of_n_k64"], kd["ceiling_k16_mean_at_bon_kl"]):
        out.append(f"{e['n']:>4} {e['kl_analytic']:>6.2f} {e['reward_unbiased']:>+8.3f} {c16:>+10.3f} "
                   f"{e['ceiling_at_kl_analytic']:>+10.3f}")
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120, sharey=True)
    curve = [p for p in res["ceiling_curve"] if math.isfinite(p["kl"])]
    ax.plot([p["kl"] for p in curve], [p["reward"] for p in curve], color="black", label="ceiling π*_β (tilting)")
    bon = res["best_of_n"]
    ax.plot([e["kl_exact_empirical"] for e in bon], [e["reward_empirical"] for e in bon], "s-", color="tab:gray",
            ms=3, label="Best-of-N over the K samples, exact KL")
    unb = [e for e in bon if e["reward_unbiased"] is not None]
    ax.plot([e["kl_analytic"] for e in unb], [e["reward_unbiased"] for e in unb], "o--", color="tab:red", ms=3,
            label="Best-of-N unbiased, at log N − (N−1)/N")
    ax.plot([e["kl_ties_population"] for e in unb], [e["reward_unbiased"] for e in unb], "^:", color="tab:blue",
            ms=3, label="Best-of-N unbiased, at tie-aware KL")
    ax.set_title(f"{res['prompts']} held-out prompts, K=16 (the README's samples)", fontsize=9)
    kd = res["k_dependence"]
    bx.plot(kd["plot_kls"], kd["plot_ceiling_k64"], color="black", label="ceiling from K=64")
    bx.plot(kd["plot_kls"], kd["plot_ceiling_k16_mean"], color="black", ls="--",
            label="ceiling from K=16 (mean of 4 disjoint)")
    b64 = kd["best_of_n_k64"]
    bx.plot([e["kl_analytic"] for e in b64], [e["reward_unbiased"] for e in b64], "o--", color="tab:red", ms=3,
            label="Best-of-N unbiased from K=64, at log N − (N−1)/N")
    bx.set_title(f"{kd['prompts']} of those prompts, K=64 (fp32): the ceiling's dependence on K", fontsize=9)
    for a in (ax, bx):
        a.set_xlabel("KL(π ‖ π_ref), nats per sequence")
        a.grid(alpha=0.3)
        a.legend(loc="lower right", fontsize=7)
    ax.set_ylabel("mean VADER compound sentiment")
    fig.suptitle("Best-of-N and the KL-regularized optimum on reference samples (SmolLM2-135M, VADER)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def regenerate(cache_dir: str | None, only: list[str], reference: Path = REFERENCE,
               precision: str | None = None) -> None:
    """Draw the samples with run.py's code and settings (shared cache) and write them under results/reference/."""
    import torch
    import transformers

    from dpokit.demo import N_TRAIN_PROMPTS, sentiment_task

    reference.mkdir(parents=True, exist_ok=True)
    prov_path = reference / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    for name in only:
        split, prompts, n, seed, set_precision = SETS[name]
        task = sentiment_task(cache_dir, 75, 20, 32, precision=precision or set_precision)
        pool = (task.train_prompts if split == "train" else task.eval_prompts)[:prompts]
        first = 0 if split == "train" else N_TRAIN_PROMPTS
        samples, scores = task.reference_samples(pool, n, seed, name)
        (reference / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt_index": s.prompt_index + first, "text": s.text,
                        "score": sc}) + "\n" for s, sc in zip(samples, scores)))
        prov[name] = {
            "openings": f"bundled_prompts()[{first}:{first + prompts}]",
            "samples_per_opening": n, "seed": seed, "max_new_tokens": 32, "temperature": 1.0,
            "precision": task.precision, "model": task.model_dir.name, "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(), "cpu": cpu_summary(),
            "prompt_index": "index into dpokit.demo.bundled_prompts()",
            "cache_file": f"demo/{name}-{task.sample_key(pool, n, seed)}.jsonl",
        }
    prov_path.write_text(json.dumps(prov, indent=1) + "\n")
    if {"train-samples", "bon-ref"} & set(only):
        write_continuations(reference)


def continuation_records(reference: Path = REFERENCE) -> list[dict]:
    """The prompt pool's source (``dpokit.demo.prompt_pool``): the first 8 words of each training and
    held-out reference sample, in sample order."""
    from dpokit.demo import _first_words

    out = []
    for name in ("train-samples", "bon-ref"):
        for ln in (reference / f"{name}.jsonl").read_text().splitlines():
            rec = json.loads(ln)
            out.append({"opening": rec["prompt_index"], "words": _first_words(rec["text"], 8)})
    return out


def write_continuations(reference: Path = REFERENCE) -> Path:
    path = Path(__file__).parents[2] / "src" / "dpokit" / "resources" / "movie_continuations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in continuation_records(reference)))
    return path


def cpu_summary() -> str:
    """The CPU's model name and its bf16 instructions (they decide which bf16 kernels run)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = sorted({f for f in info.split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")})
    return f"{name} ({' '.join(flags) or 'no AVX2'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regenerate", nargs="*", choices=sorted(SETS), default=None,
                    help="draw these sample sets again (all when none is named) into results/reference/")
    ap.add_argument("--precision", default=None, help="sampling precision for every set (default: each set's own)")
    ap.add_argument("--cache-dir", default=None, help="model/sample cache (default: ~/.cache/dpokit)")
    ap.add_argument("--out", default=str(HERE / "results" / "ceiling"))
    args = ap.parse_args()
    if args.regenerate is not None:
        regenerate(args.cache_dir, args.regenerate or sorted(SETS), precision=args.precision)
    res = analyse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / "ceiling.png")
    print(report(res))


if __name__ == "__main__":
    main()
