"""The on-policy frontier (examples/sentiment/onpolicy.py): its plans spend equal judge budgets, run.py's points join
only when evaluated on the same prompts, and the committed results recompute (each efficiency from its per-prompt
values, each method's budget from its plan)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dpokit.eval.stats import efficiency

ROOT = Path(__file__).parents[1] / "examples" / "sentiment"
pytestmark = pytest.mark.skipif(not (ROOT / "onpolicy.py").is_file(), reason="examples/ not in this checkout")


@pytest.fixture(scope="module")
def onpolicy():
    sys.path.insert(0, str(ROOT))  # it reads run.py's pieces as `run`
    spec = importlib.util.spec_from_file_location("sentiment_onpolicy", ROOT / "onpolicy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
        sys.modules.pop("run", None)
        sys.path.remove(str(ROOT))


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
