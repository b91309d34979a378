"""A frontier from snapshots along training: weights snapshots, evaluation of (label, model) points, upper
envelopes, Best-of-N chosen by another score, Spearman's rank correlation, and `dpokit frontier` end to end."""

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from dpokit.eval.frontier import Point, evaluate_models, per_prompt, run_models, upper_envelope
from dpokit.eval.stats import best_of_n_by, expected_best_of_n, spearman


def enumerate_best_of_n_by(selection, values, n):
    """Every n-subset (without replacement) equally likely; ties in selection broken uniformly."""
    total, count = 0.0, 0
    for subset in itertools.combinations(range(len(selection)), n):
        top = max(selection[i] for i in subset)
        best = [i for i in subset if selection[i] == top]
        total += sum(values[i] for i in best) / len(best)
        count += 1
    return total / count


@pytest.mark.parametrize("seed", range(4))
def test_best_of_n_by_another_score_against_enumeration(seed):
    rng = random.Random(seed)
    k = 7
    selection = [rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in range(k)]  # ties in the selection score
    values = [rng.uniform(-1, 1) for _ in range(k)]
    for n in range(1, k + 1):
        assert best_of_n_by(selection, values, n) == pytest.approx(enumerate_best_of_n_by(selection, values, n),
                                                                     abs=1e-12)
    distinct = [rng.uniform(-1, 1) for _ in range(k)]
    for n in range(1, k + 1):  # choosing by the reward itself is ordinary Best-of-N
        assert best_of_n_by(distinct, distinct, n) == pytest.approx(expected_best_of_n(distinct, n), abs=1e-12)
    assert best_of_n_by(selection, values, 1) == pytest.approx(sum(values) / k)  # N = 1: the reference
    with pytest.raises(ValueError):
        best_of_n_by(selection, values, k + 1)


def test_spearman_by_hand():
    # ranks of b: 1, 2, 3.5, 5, 3.5; centred: (-2,-1,0,1,2) and (-2,-1,0.5,2,0.5): 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    a, b = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6], [2.0, 7.0, 1.0, 8.0, 2.8, 1.8]
    ra = [4, 1, 5, 2, 6, 3]
    rb = [3, 5, 1, 6, 4, 2]
    d2 = sum((x - y) ** 2 for x, y in zip(ra, rb))
    assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (6 * 35), abs=1e-12)  # no ties: 1 - 6 sum d^2 / n(n^2-1)
    assert spearman(a, [-x for x in a]) == pytest.approx(-1.0)


def test_upper_envelope_keeps_the_points_nothing_beats_at_less_kl():
    def pt(label, kl, reward):
        return Point(label, "m", reward, 0.0, kl, 0.0, [reward], [kl], 1)

    pts = [pt("a", 0.1, 0.2), pt("b", 0.3, 0.1), pt("c", 0.5, 0.4), pt("d", 0.5, 0.3), pt("e", 0.9, 0.35),
           pt("f", 1.2, 0.6), pt("g", 0.0, 0.0)]
    assert [p.label for p in upper_envelope(pts)] == ["g", "a", "c", "f"]


def test_per_prompt_means():
    assert per_prompt([1.0, 3.0, 5.0], [1, 1, 0], 2) == [5.0, 2.0]
    with pytest.raises(ValueError):
        per_prompt([1.0], [0], 2)


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory, tiny_model_dir) -> Path:
    from conftest import tiny_dpo_run

    return tiny_dpo_run(tmp_path_factory.mktemp("frontier"), tiny_model_dir, "dpo-run", 5, "train.snapshot_steps=2",
                        "train.save_steps=4", "train.keep_last=5")


def test_snapshots_are_the_weights_at_their_step(snapshot_run):
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    assert sorted(p.name for p in (snapshot_run / "snapshots").iterdir()) == ["step-2", "step-4"]
    snap = AutoModelForCausalLM.from_pretrained(snapshot_run / "snapshots" / "step-4")  # a model directory
    ckpt = AutoModelForCausalLM.from_pretrained(snapshot_run / "snapshots" / "step-2")
    load_model(ckpt, str(snapshot_run / "checkpoints" / "step-4" / "model.safetensors"))  # the resumable state
    a, b = snap.state_dict(), ckpt.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    start = AutoModelForCausalLM.from_pretrained(snapshot_run / "snapshots" / "step-2").state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # step 2 and step 4 differ
    models = run_models(snapshot_run)
    assert [(label, step) for label, _, step in models] == [("step 2", 2), ("step 4", 4), ("final", 5)]
    assert run_models(snapshot_run / "final")[-1][1] == snapshot_run / "final"


def first_char(prompt: str, completion: str) -> float:
    return float(ord(completion[0])) if completion else 0.0


def test_evaluate_models_kl_zero_for_the_reference(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from dpokit.eval.judges import FunctionJudge

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = ["The movie was", "I thought", "Overall,"]
    [point] = evaluate_models([("reference", reference)], reference, tokenizer, prompts, FunctionJudge(first_char),
                              n=3, max_new_tokens=4, seed=1)
    assert point.prompt_kls == [0.0, 0.0, 0.0] and point.kl == 0.0 and point.samples == 9
    assert len(point.prompt_rewards) == 3 and point.reward == pytest.approx(sum(point.prompt_rewards) / 3)


def test_frontier_command_end_to_end(tmp_path, snapshot_run, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nI thought\nOverall,\n")
    out = tmp_path / "out"
    assert run_cli("frontier", snapshot_run, "--ref-model", tiny_model_dir, "--prompts", prompts, "--judge",
                   "test_frontier:first_char", "-n", 2, "--ref-samples", 4, "--best-of", 1, 2, 4,
                   "--max-new-tokens", 4, "--out", out) == 0
    res = json.loads((out / "frontier.json").read_text())
    assert [p["label"] for p in res["points"]] == ["step 2", "step 4", "final"]
    assert [p["step"] for p in res["points"]] == [2, 4, 5]
    assert all(len(p["prompt_rewards"]) == 3 and p["samples"] == 6 for p in res["points"])
    assert all(p["efficiency"] is not None for p in res["points"])
    assert set(res["runs"]["dpo-run"]["envelope"]) <= {"step 2", "step 4", "final"}
    bon = res["best_of_n"]
    assert [p["info"]["n"] for p in bon] == [1, 2, 4]
    ref_mean = sum(sum(v) / len(v) for v in res["reference_rewards"]) / 3
    assert bon[0]["reward"] == pytest.approx(ref_mean) and bon[0]["kl"] == 0.0  # N = 1 is the reference
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 * 6
    assert "efficiency" in capsys.readouterr().out
