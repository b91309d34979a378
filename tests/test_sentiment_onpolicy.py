"""The on-policy frontier (examples/sentiment/onpolicy.py): its plans spend equal judge budgets, run.py's points join
only when evaluated on the same prompts, and the committed results recompute (each efficiency from its per-prompt
values, each method's budget from its plan)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dpokit.eval.stats import efficiency

ROOT = Path(__file__).parents[1] / "examples" / "sentiment"
pytestmark = pytest.mark.skipif(not (ROOT / "onpolicy.py").is_file(), reason="examples/ not in this checkout")


def _script(file: str):
    """Load an example script as a module; it reads its siblings (run.py, onpolicy.py) by their plain names."""
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"sentiment_{Path(file).stem}", ROOT / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        for name in (spec.name, "onpolicy", "run", "rloo_pistar"):
            sys.modules.pop(name, None)
        sys.path.remove(str(ROOT))


@pytest.fixture(scope="module")
def onpolicy():
    yield from _script("onpolicy.py")


@pytest.mark.parametrize("which", ["QUICK", "FULL"])
def test_plans_split_the_budget_evenly(onpolicy, which):
    plan = getattr(onpolicy, which)
    assert plan.budget == plan.train_prompts * plan.n
    assert plan.train_prompts % plan.rounds == 0  # every online round scores budget / rounds samples
    assert plan.train_prompts % plan.rl_batch == 0  # RLOO's last step is a whole one
    assert plan.n <= 8  # offline methods read the first n of the 8 committed samples per prompt


def test_run_py_points_join_only_on_the_same_prompts(onpolicy):
    point = {"label": "final", "method": "dpo-beta0.1-lr2e-05", "reward": 0.3, "reward_stderr": 0.1, "kl": 0.5,
             "kl_stderr": 0.1, "prompt_rewards": [0.3], "prompt_kls": [0.5], "samples": 2, "info": {"beta": 0.1}}
    bon = {**point, "method": "best-of-n", "label": "Best-of-N N=2"}
    frontier = {"eval_prompts": 100, "plan": {"train_prompts": 525}, "points": [point, bon],
                "envelopes": {"dpo-beta0.1-lr2e-05": ["final"]}}
    got = onpolicy._run_py_points(frontier, 100)
    assert [p["method"] for p in got] == ["dpo-beta0.1-lr2e-05"] and got[0]["info"]["judge_budget"] == 525 * 8
    assert point["info"] == {"beta": 0.1}  # not modified in place
    assert onpolicy._run_py_points(frontier, 20) == [] and onpolicy._run_py_points(None, 100) == []


@pytest.mark.parametrize("which", ["quick", "full"])
def test_committed_results_recompute(onpolicy, which):
    path = ROOT / "results" / f"onpolicy-{which}" / "frontier.json"
    result = json.loads(path.read_text()) if path.is_file() else None
    if result is None or "methods" not in result:
        pytest.skip(f"no onpolicy-{which} results committed")
    run = sys.modules["run"]
    heldout = run.by_prompt(run.read_set("pool-heldout"), "score", result["eval_prompts"])
    points = [onpolicy.Point(**p) for p in result["points"]]
    trained = [p for p in points if p.method in result["methods"]]
    assert {p.method for p in trained} == set(result["methods"])
    for p in trained:
        assert len(p.prompt_rewards) == result["eval_prompts"] and p.info["judge_budget"] <= result["budget"]
        again = efficiency(p.prompt_rewards, p.prompt_kls, heldout, n_boot=0)
        assert again.efficiency == pytest.approx(p.efficiency["efficiency"], rel=1e-9, abs=1e-12)
    for m in result["methods"]:  # the last point of each method has spent the whole budget
        assert max(p.info["judge_budget"] for p in trained if p.method == m) == result["budget"]
    table = onpolicy.table(result)
    assert all(onpolicy.METHODS[m][0] in table for m in result["methods"])


@pytest.fixture(scope="module")
def pistar():
    yield from _script("rloo_pistar.py")


def test_pi_star_comparison_by_hand(pistar):
    """A point placed at pi*_beta compares at zero; one a known distance away gets that difference over the
    combined standard error; a huge beta's pi* is the reference itself (KL 0, the mean reward)."""
    from dpokit.eval.frontier import Point

    rng = np.random.default_rng(0)
    rewards = rng.uniform(-1, 1, size=(30, 16)).tolist()
    star = pistar.pistar_with_stderr(rewards, 0.5, n_boot=200)
    assert star["objective"] == pytest.approx(star["reward"] - 0.5 * star["kl"])
    assert star["kl_stderr"] > 0 and star["reward_stderr"] > 0
    flat = pistar.pistar_with_stderr(rewards, 1e6, n_boot=50)
    assert flat["kl"] == pytest.approx(0, abs=1e-9) and flat["reward"] == pytest.approx(np.mean(rewards), rel=1e-4)
    # per-prompt values whose means sit exactly at pi*, then 0.3 nats further and 0.1 lower
    kls = [star["kl"] - 0.05, star["kl"] + 0.05] * 10
    rws = [star["reward"] + 0.02, star["reward"] - 0.02] * 10
    at = Point.of("final", "rloo", rws, kls, samples=20)
    c = pistar.compare(at, star)
    assert c["kl_diff"] == pytest.approx(0, abs=1e-12) and c["reward_diff"] == pytest.approx(0, abs=1e-12)
    assert c["objective_z"] == pytest.approx(0, abs=1e-9)
    off = Point.of("s", "rloo", [r - 0.1 for r in rws], [k + 0.3 for k in kls], samples=20)
    c = pistar.compare(off, star)
    assert c["kl_z"] == pytest.approx(0.3 / np.hypot(off.kl_stderr, star["kl_stderr"]))
    assert c["reward_z"] == pytest.approx(-0.1 / np.hypot(off.reward_stderr, star["reward_stderr"]))
    j = [r - 0.5 * k for r, k in zip(off.prompt_rewards, off.prompt_kls)]  # KL up, reward down: J's error is larger
    assert c["objective_diff"] == pytest.approx(-0.1 - 0.5 * 0.3)
    assert c["objective_stderr"] == pytest.approx(np.std(j, ddof=1) / np.sqrt(len(j)))
    assert c["objective_stderr"] > np.hypot(off.reward_stderr, 0.5 * off.kl_stderr)
    assert c["objective_z"] == pytest.approx((-0.1 - 0.15) / np.hypot(c["objective_stderr"], star["objective_stderr"]))


@pytest.mark.parametrize("name", ["rloo-pistar-full", "rloo-pistar-k8", "rloo-pistar-2pass",
                                  "rloo-pistar-lr5e-6", "rloo-pistar-heldout"])
def test_committed_pi_star_comparison_recomputes(pistar, name):
    """pi*_beta recomputes from the committed held-out reference samples (with its bootstrap errors), and every
    comparison from its point."""
    from dpokit.eval.frontier import Point

    path = ROOT / "results" / name / "result.json"
    if not path.is_file():
        pytest.skip(f"{path} not committed")
    result = json.loads(path.read_text())
    from run import by_prompt, read_set  # on the path while the fixture's script is loaded

    heldout = by_prompt(read_set("pool-heldout"), "score", result["eval_prompts"])
    star = pistar.pistar_with_stderr(heldout, result["plan"]["beta"])
    for key, value in star.items():
        assert result["pi_star"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for p, c in zip(result["points"], result["comparisons"]):
        _same(c, pistar.compare(Point(**p), star))


@pytest.fixture(scope="module")
def btstar():
    yield from _script("bt_pistar.py")


def test_bradley_terry_pairs_of_the_reference_samples(btstar):
    """Every training prompt's 8 committed samples make 4 pairs as drawn (one left out per empty text, counted);
    the labels agree with VADER's order about as often as sigma(|dr| / tau) says, more often at a lower tau; a
    tied pair is labelled by a coin."""
    from run import read_set

    from dpokit.demo import prompt_pool

    rows, prompts = read_set("pool-train"), prompt_pool().train[:100]
    mine = [r for r in rows if r["prompt_index"] < 100]
    agree = {}
    for tau in (0.05, 1.0):
        recs, stats = btstar.bt_pairs(rows, prompts, tau)
        assert stats["pairs"] + sum(stats["left_out"].values()) == len(mine) // 2 == 400
        assert stats["prompts_without_pair"] == 0
        decided = len(recs) - stats["tied_scores"]
        se = np.sqrt(stats["expected_agreement"] * (1 - stats["expected_agreement"]) / decided)
        assert abs(stats["label_agrees_with_scores"] - stats["expected_agreement"]) < 3 * se
        agree[tau] = stats["label_agrees_with_scores"]
        texts = {(r["prompt_index"], r["text"]): r["score"] for r in mine}
        for r in recs[:50]:  # each record carries its samples' own scores
            i = prompts.index(r["prompt"])
            assert texts[(i, r["chosen"])] == r["chosen_score"] and texts[(i, r["rejected"])] == r["rejected_score"]
    assert agree[0.05] > agree[1.0] + 0.1
    assert btstar.bt_pairs(rows, prompts, 1.0) == btstar.bt_pairs(rows, prompts, 1.0)  # seeded per prompt


def test_committed_bradley_terry_comparison_recomputes(btstar):
    """The committed DPO-on-BT-labels result: its pairs remake from the reference samples, pi*_{tau beta} and
    pi*_beta from the held-out ones, every comparison from its point, and the final point's efficiency."""
    from run import by_prompt, read_set

    from dpokit.demo import prompt_pool
    from dpokit.eval.frontier import Point

    path = ROOT / "results" / "bt-pistar-full" / "result.json"
    if not path.is_file():
        pytest.skip(f"{path} not committed")
    result = json.loads(path.read_text())
    p = result["plan"]
    _, stats = btstar.bt_pairs(read_set("pool-train"), prompt_pool().train[: p["train_prompts"]], p["tau"])
    assert stats == result["pairs"]
    heldout = by_prompt(read_set("pool-heldout"), "score", result["eval_prompts"])
    for key, beta in (("pi_star", p["tau"] * p["beta"]), ("pi_star_beta", p["beta"])):
        star = btstar.pistar_with_stderr(heldout, beta)
        assert result[key] == pytest.approx(star, rel=1e-9, abs=1e-12)
        for q, c in zip(result["points"], result[f"comparisons_{key}"]):
            _same(c, btstar.compare(Point(**q), star))
    last = result["points"][-1]  # the final point's efficiency against the ceiling at its KL
    _same(last["efficiency"], efficiency(last["prompt_rewards"], last["prompt_kls"], heldout,
                                         n_boot=btstar.N_BOOT).to_dict())


def _same(stored: dict, again: dict) -> None:
    """A committed record equals its recomputation: floats to 1e-9, everything else exactly."""
    assert stored.keys() == again.keys()
    for key, value in again.items():
        assert stored[key] == (pytest.approx(value, rel=1e-9, abs=1e-12) if isinstance(value, float) else value), key
