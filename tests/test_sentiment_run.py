"""The redone sentiment experiment (examples/sentiment/run.py): its pairs, its bookkeeping, its committed pool samples
and its committed results (every efficiency in the table recomputed from the per-prompt values it stores)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from dpokit.demo import prompt_pool, sentiment, vader
from dpokit.eval.stats import efficiency

ROOT = Path(__file__).parents[1] / "examples" / "sentiment"
REFERENCE = ROOT / "results" / "reference"
pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason="examples/ not in this checkout")


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("sentiment_run", ROOT / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _rows(scores_by_prompt: dict[int, list[float]]) -> list[dict]:
    return [{"prompt_index": i, "text": f"p{i} s{j} ({s})", "score": s, "completion_ids": [j]}
            for i, scores in scores_by_prompt.items() for j, s in enumerate(scores)]


def test_best_vs_worst_of_eight_and_its_skips(run):
    rows = _rows({0: [0.1, -0.5, 0.9, 0.0, 0.3, 0.2, -0.1, 0.4, 0.99],  # the 9th sample is not among the first 8
                  1: [0.0] * 8,  # all tied: skipped and counted
                  2: [0.2] * 8})  # ranked after prompt 1: a prompt index beyond the prompts given is ignored
    records, skipped = run.make_pairs(rows, ["a", "b"], "bw8")
    assert skipped == 1
    assert [(r["prompt"], r["chosen_score"], r["rejected_score"]) for r in records] == [("a", 0.9, -0.5)]


def test_all_six_pairs_of_the_first_four_ties_skipped(run):
    rows = _rows({0: [0.4, -0.2, 0.1, 0.7, 0.9], 1: [0.5, 0.5, 0.0, -0.5]})
    records, skipped = run.make_pairs(rows, ["a", "b"], "all6")
    assert skipped == 0
    assert [(r["chosen_score"], r["rejected_score"]) for r in records if r["prompt"] == "a"] == [
        (0.7, 0.4), (0.7, 0.1), (0.7, -0.2), (0.4, 0.1), (0.4, -0.2), (0.1, -0.2)]
    assert len([r for r in records if r["prompt"] == "b"]) == 5  # the tied pair (0.5, 0.5) is not a preference


def test_snapshots_split_the_epoch_evenly(run):
    plan = run.FULL
    steps = math.ceil(525 / plan.batch_size)  # 66 steps at batch 8
    every = run.snapshot_every(525, plan)
    assert len(range(every, steps, every)) == plan.snapshots  # snapshots before the final model, evenly spaced
    assert steps - every * plan.snapshots <= every
    assert run.snapshot_every(3, plan) == 1


def test_first_k_and_by_rows_keep_sample_order(run):
    rows = _rows({0: [1, 2, 3], 1: [4, 5, 6], 2: [7]})
    picked = run.first_k(rows, 2, 2)
    assert [(r["prompt_index"], r["score"]) for r in picked] == [(0, 1), (0, 2), (1, 4), (1, 5)]
    assert run.by_rows(picked, [r["score"] * 10 for r in picked], 2) == [[10, 20], [40, 50]]
    assert run.by_prompt(rows, "score", 2, 1) == [[1], [4]]


def _pool_set(name: str) -> list[dict]:
    return [json.loads(ln) for ln in (REFERENCE / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name, per_prompt", [("pool-train", 8), ("pool-heldout", 64)])
def test_committed_pool_samples_have_their_shape_and_vader_scores(run, name, per_prompt):
    """The first ``prompts_drawn`` prompts of the split, each with its samples; at least what --quick reads
    (the full run checks for its 525 and says how to draw them)."""
    prov = json.loads((REFERENCE / "provenance.json").read_text()).get(name)
    if prov is None or not (REFERENCE / f"{name}.jsonl").is_file():
        pytest.skip(f"{name} samples not committed (run.py --regenerate {name} draws them)")
    rows = _pool_set(name)
    prompts = prov["prompts_drawn"]
    split = prompt_pool().train if name == "pool-train" else prompt_pool().heldout
    assert run.QUICK.train_prompts <= prompts <= len(split) if name == "pool-train" else prompts == len(split)
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["prompt_index"]] = counts.get(r["prompt_index"], 0) + 1
    assert counts == {i: per_prompt for i in range(prompts)}
    assert (prov["samples_per_prompt"], prov["precision"], prov["max_new_tokens"]) == (per_prompt, "fp32", 32)
    some = rows[:: max(1, len(rows) // 300)]  # VADER is deterministic: the stored scores are its scores
    assert sentiment(vader(), [r["text"] for r in some]) == pytest.approx([r["score"] for r in some], abs=1e-12)
    assert all(1 <= len(r["completion_ids"]) <= 32 for r in rows)


@pytest.mark.parametrize("which", ["quick", "full"])
def test_committed_results_efficiency_recomputes(run, which):
    path = ROOT / "results" / which / "frontier.json"
    result = json.loads(path.read_text()) if path.is_file() else None
    if result is None or "envelopes" not in result:
        pytest.skip(f"no {which} results of this experiment committed")
    heldout = run.by_prompt(_pool_set("pool-heldout"), "score", result["eval_prompts"])
    points = [run.Point(**p) for p in result["points"]]
    dpo = [p for p in points if p.method in result["envelopes"]]
    assert dpo and all(len(p.prompt_rewards) == result["eval_prompts"] for p in dpo)
    best = max(dpo, key=lambda p: p.efficiency["efficiency"])
    again = efficiency(best.prompt_rewards, best.prompt_kls, heldout, n_boot=200)
    assert again.efficiency == pytest.approx(best.efficiency["efficiency"], rel=1e-9)
    assert f"{best.efficiency['efficiency']:.0%}" in run.table(result)
    for p in points:  # a point's reward and KL are the means over prompts of what it stores per prompt
        assert p.reward == pytest.approx(sum(p.prompt_rewards) / len(p.prompt_rewards), rel=1e-9, abs=1e-12)
        assert p.kl == pytest.approx(sum(p.prompt_kls) / len(p.prompt_kls), rel=1e-9, abs=1e-12)


def test_a_missing_sample_set_is_one_line_naming_the_file(run, tmp_path, monkeypatch):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "pool-heldout.jsonl").write_text("")
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--reference", str(tmp_path / "ref"),
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as err:
        run.main()
    assert str(err.value) == f"{tmp_path / 'ref' / 'pool-train.jsonl'}: not found: draw it with --regenerate pool-train"
