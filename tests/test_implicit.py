"""dpokit score and --judge implicit:RUN: a DPO model's implicit reward beta * (log pi - log pi_ref), checked
against log-probs computed token by token from full logits on the tiny model."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_dpo import naive_logps

from dpokit.data.formats import to_sft
from dpokit.data.tokenize import tokenize_sft

RECORDS = [
    {"prompt": "The movie was", "completion": " wonderful and moving."},
    {"prompt": "The movie was", "completion": " dull."},
    {"prompt": "I thought the acting", "completion": " was superb throughout, really."},
    {"prompt": [{"role": "user", "content": "Review the film."}],
     "completion": [{"role": "assistant", "content": "A joyful triumph."}]},
]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A real run: 2 DPO steps at a large learning rate, so the policy differs from its reference."""
    from conftest import tiny_dpo_run

    return tiny_dpo_run(tmp_path_factory.mktemp("implicit"), tiny_model_dir, "run", 2, "--beta", 0.3)


def naive_scores(run: Path, reference_dir: Path, tokenizer, records) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    from transformers import AutoModelForCausalLM

    items = [tokenize_sft(tokenizer, to_sft(r, f"r{i}"), max_length=1024, max_prompt_length=512)
             for i, r in enumerate(records)]
    rows = [(x.prompt_ids, x.completion_ids) for x in items]
    policy = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    return naive_logps(policy, rows), naive_logps(reference, rows), [len(c) for _, c in rows]


def test_score_equals_beta_times_token_by_token_log_ratio(tmp_path, dpo_run, tiny_model_dir, tokenizer, capsys):
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "scores.jsonl"
    assert run_cli("score", "--model", dpo_run, "--data", data, "--out", out, "--batch-size", 3,
                   "--precision", "fp32") == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    pol, ref, lengths = naive_scores(dpo_run, tiny_model_dir, tokenizer, RECORDS)
    expected = 0.3 * (pol - ref)  # beta from the run's config
    assert expected.abs().min() > 1e-3  # a real comparison: the policy moved
    torch.testing.assert_close(torch.tensor([r["reward"] for r in rows], dtype=torch.float64), expected,
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.tensor([r["logp"] for r in rows], dtype=torch.float64), pol, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(torch.tensor([r["ref_logp"] for r in rows], dtype=torch.float64), ref, atol=1e-4,
                               rtol=1e-6)
    assert [r["tokens"] for r in rows] == lengths  # EOS appended (counted), as in training
    assert "4 records scored" in capsys.readouterr().err

    # --beta overrides the run's; the reference-free option is the per-token mean log-prob of the model alone
    assert run_cli("score", "--model", dpo_run / "final", "--data", data, "--out", out, "--beta", 2.0) == 0
    got = torch.tensor([json.loads(ln)["reward"] for ln in out.read_text().splitlines()], dtype=torch.float64)
    torch.testing.assert_close(got, 2.0 * (pol - ref), atol=1e-3, rtol=1e-5)
    assert run_cli("score", "--model", dpo_run, "--data", data, "--out", out, "--reference-free") == 0
    got = torch.tensor([json.loads(ln)["reward"] for ln in out.read_text().splitlines()], dtype=torch.float64)
    torch.testing.assert_close(got, pol / torch.tensor(lengths, dtype=torch.float64), atol=1e-5, rtol=1e-6)


def test_a_policy_scored_against_itself_is_exactly_zero(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "s.jsonl"
    assert run_cli("score", "--model", tiny_model_dir, "--ref-model", tiny_model_dir, "--beta", 0.1, "--data", data,
                   "--out", out) == 0
    assert [json.loads(ln)["reward"] for ln in out.read_text().splitlines()] == [0.0] * len(RECORDS)
    # a model outside a run has no beta to take: it must be given
    assert run_cli("score", "--model", tiny_model_dir, "--ref-model", tiny_model_dir, "--data", data) == 2
    assert "give the beta" in capsys.readouterr().err


def test_implicit_judge_ranks_pairs_by_the_same_score(tmp_path, dpo_run, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nI thought\n")
    pairs = tmp_path / "pairs.jsonl"
    assert run_cli("pairs", "--model", tiny_model_dir, "--prompts", prompts, "--judge", f"implicit:{dpo_run}",
                   "-n", 4, "--max-new-tokens", 5, "--out", pairs) == 0
    records = [json.loads(ln) for ln in pairs.read_text().splitlines()]
    assert records and all(r["chosen_score"] > r["rejected_score"] for r in records)
    # the judge's score of a chosen completion is what dpokit score gives the same (prompt, completion)
    out = tmp_path / "s.jsonl"
    assert run_cli("score", "--model", dpo_run, "--data", pairs, "--out", out) == 0  # a pair record: its chosen side
    scored = [json.loads(ln)["reward"] for ln in out.read_text().splitlines()]
    assert scored == pytest.approx([r["chosen_score"] for r in records], abs=1e-5)
