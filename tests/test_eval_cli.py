"""dpokit eval and dpokit pairs end to end on the tiny model."""

import json
from pathlib import Path

import pytest

from dpokit.cli import main


def first_char_judge(prompt: str, completion: str) -> float:
    """A deterministic toy reward: the code point of the completion's first character."""
    return float(ord(completion[0])) if completion else 0.0


def test_eval_on_preferences_and_prompts(tmp_path: Path, tiny_model_dir: Path, pairs_file: Path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The movie was\nI thought\n")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--ref-model", str(tiny_model_dir), "--data", str(pairs_file),
                 "--prompts", str(prompts), "--judge", "test_eval_cli:first_char_judge", "--num-samples", "3",
                 "--max-new-tokens", "5", "--out", str(out)]) == 0
    report = json.loads((out / "eval_report.json").read_text())
    pref = report["preferences"]
    assert pref["pairs"] == 8
    # the policy is its own reference: every implicit reward is 0, so no pair is ranked right
    assert pref["rewards/margins"] == 0.0 and pref["rewards/accuracies"] == 0.0
    assert 0.0 <= pref["logps_accuracy"] <= 1.0
    gen = report["generation"]
    # same model, same seeds: identical samples, all ties, KL exactly 0
    assert gen["win_rate"]["ties"] == 6 and gen["win_rate"]["wins"] == 0
    assert gen["kl"]["sequence"] == 0.0
    rows = [json.loads(ln) for ln in (out / "per_example.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"logp_chosen", "reward_chosen", "margin", "source"} <= set(rows[0])
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6


def test_eval_refuses_incomplete_requests(tmp_path: Path, tiny_model_dir: Path, capsys):
    assert main(["eval", "--model", str(tiny_model_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    p = tmp_path / "p.txt"
    p.write_text("x\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--prompts", str(p), "--judge", "a:b"]) == 2
    assert "give --ref-model" in capsys.readouterr().err


def test_pairs_are_deterministic_under_a_seed(tmp_path: Path, tiny_model_dir: Path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Review {i}:"}) + "\n" for i in range(3)))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["pairs", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--judge",
                     "test_eval_cli:first_char_judge", "-n", "4", "--max-new-tokens", "6", "--seed", "3",
                     "--out", str(out)]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] and outs[0]
    rows = [json.loads(ln) for ln in outs[0].splitlines()]
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
    all_pairs = tmp_path / "all.jsonl"
    assert main(["pairs", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--judge",
                 "test_eval_cli:first_char_judge", "-n", "4", "--max-new-tokens", "6", "--seed", "3",
                 "--mode", "all-pairs", "--out", str(all_pairs)]) == 0
    assert len(all_pairs.read_text().splitlines()) >= len(rows)
    # the pairs train directly
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(all_pairs), "--output-dir",
                 str(tmp_path / "run"), "--max-steps", "1", "train.batch_size=2", "precision=fp32"]) == 0


@pytest.mark.parametrize("extra", [["--judge", "x:y", "--judge-rm", "z"]])
def test_one_judge_only(tmp_path, tiny_model_dir, extra, capsys):
    p = tmp_path / "p.txt"
    p.write_text("x\n")
    assert main(["pairs", "--model", str(tiny_model_dir), "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"),
                 *extra]) == 2
    assert "give one judge" in capsys.readouterr().err


def test_reward_model_judge_scores_with_a_sequence_classifier(tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from dpokit.eval.judges import RewardModelJudge

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=2)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"))
    a = judge.score(["Hi", "Hi"], ["hello there", "go away now please"])
    b = judge.score(["Hi"], ["go away now please"])
    assert len(a) == 2 and a[0] != a[1]
    assert a[1] == pytest.approx(b[0], abs=1e-4)  # padding in a batch does not change a score
