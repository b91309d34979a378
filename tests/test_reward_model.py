"""dpokit rm: the reward model's scores equal Hugging Face's own sequence-classification forward in every layout;
trained on pairs labelled by a known toy reward it ranks held-out pairs far above chance; the saved model scores
the same through --judge-rm."""

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import PAIRS, read_metrics, run_cli

from dpokit.data.collate import LAYOUTS
from dpokit.data.formats import to_preference
from dpokit.data.tokenize import tokenize_pair
from dpokit.reward_model import RewardScores, load_reward_model, reward_row
from dpokit.train.rm import RewardRecipe

WORDS = [" good", " bad", " movie", " plot", " the", " film"]


def toy_reward(completion: str) -> int:
    """The known reward the pairs are labelled by: how many times the completion says ' good'."""
    return completion.count(" good")


def toy_pairs(n: int, seed: int) -> list[dict]:
    """Pairs of 6-word completions with different toy rewards; chosen = the higher one."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        a, b = ("".join(rng.choice(WORDS) for _ in range(6)) for _ in range(2))
        if toy_reward(a) != toy_reward(b):
            c, r = (a, b) if toy_reward(a) > toy_reward(b) else (b, a)
            out.append({"prompt": "Review:", "chosen": c, "rejected": r})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_row_cuts_after_the_last_non_pad_token():
    assert reward_row([5, 6], [7, 8, 2], pad_id=2) == ([5, 6], [7, 8, 2])  # EOS = pad: the row is the sequence
    assert reward_row([5, 6], [7, 8, 2, 2], pad_id=2) == ([5, 6], [7, 8, 2])
    assert reward_row([5, 6], [7, 8, 9], pad_id=2) == ([5, 6], [7, 8, 9, 2])  # EOS != pad: read at the EOS (9)
    assert reward_row([5], [2], pad_id=2) == ([5], [2])  # read at the prompt's last token
    assert reward_row([], [7, 8, 2], pad_id=2) == ([7], [8, 2])  # a sequence's first token is never a target
    with pytest.raises(ValueError):
        reward_row([], [2, 2], pad_id=2)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_scores_equal_the_sequence_classifier_forward(tiny_model_dir, tokenizer, kind):
    """RewardScores in each layout == AutoModelForSequenceClassification(right-padded ids).logits[:, 0]."""
    model = load_reward_model(str(tiny_model_dir), tokenizer.pad_token_id)
    pairs = [tokenize_pair(tokenizer, to_preference(r, f"t:{i}"), max_length=256, max_prompt_length=128)
             for i, r in enumerate(PAIRS)]
    recipe = RewardRecipe(tokenizer.pad_token_id, kind)
    batch = recipe.collate(pairs, list(range(len(pairs))))
    with torch.no_grad():
        ours = RewardScores(model)(batch.seqs)
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert batch.seqs.name == kind
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert ours.std() > 0  # a real comparison: the scores differ between sequences


def test_rm_learns_a_toy_reward_and_loads_back_through_judge_rm(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", toy_pairs(256, seed=0))
    heldout_rows = toy_pairs(200, seed=1)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", heldout_rows)
    run = tmp_path / "rm"
    assert run_cli("rm", "--model", tiny_model_dir, "--data", train, "--eval-data", heldout, "--output-dir", run,
                   "--epochs", 1, "train.batch_size=16", "train.lr=3e-3", "precision=fp32", "train.save_steps=8") == 0
    rows = read_metrics(run)
    assert {"loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected", "grad_norm"} <= set(rows[0])
    accuracy = rows[-1]["eval/accuracy"]
    # the stated margin: chance is 0.5 (every held-out pair has distinct rewards); the tiny model reaches >= 0.9
    assert accuracy >= 0.9, accuracy
    assert rows[-2]["loss"] < rows[0]["loss"]

    # the checkpoint and final/ hold the reward head (unwrap found the model inside RewardScores)
    from safetensors.torch import load_file

    assert "score.weight" in load_file(str(run / "checkpoints" / "step-8" / "model.safetensors"))
    final = run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert "dpokit_reward_model" in config and "dpokit rm" in (final / "README.md").read_text()

    # --judge-rm loads it and scores held-out pairs like the training-side evaluation did
    from dpokit.eval.judges import RewardModelJudge

    judge = RewardModelJudge(str(final), batch_size=64)
    chosen = judge.score([r["prompt"] for r in heldout_rows], [r["chosen"] for r in heldout_rows])
    rejected = judge.score([r["prompt"] for r in heldout_rows], [r["rejected"] for r in heldout_rows])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(heldout_rows) == pytest.approx(accuracy, abs=1e-9)
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(heldout_rows)
    assert margin == pytest.approx(rows[-1]["eval/margin"], abs=1e-4)
    # and ranks completions by the toy reward it was never told
    texts = [" good good good bad the film", " bad bad the plot movie film"]
    scores = judge.score(["Review:"] * 2, texts)
    assert scores[0] > scores[1]



@pytest.mark.parametrize("bad,message", [
    (["--loss", "ipo"], "has no effect on `dpokit rm`"),
    (["model.lora_r=4"], "trains all weights"),
    (["--ref-model", "x"], "has no effect on `dpokit rm`"),
])
def test_rm_refuses_keys_it_would_ignore(tmp_path, tiny_model_dir, pairs_file, capsys, bad, message):
    assert run_cli("rm", "--model", tiny_model_dir, "--data", pairs_file, "--output-dir", tmp_path / "r",
                   "--max-steps", 1, *bad) == 2
    assert message in capsys.readouterr().err


def test_rm_is_a_training_stage_like_the_others(tmp_path, tiny_model_dir, pairs_file, capsys):
    """--overwrite replaces a finished run, a second plain run into it is refused, and a run that fails before
    its first step leaves no directory (the same guarded path as sft and dpo)."""
    run = tmp_path / "r"
    common = ["rm", "--model", tiny_model_dir, "--data", pairs_file, "--output-dir", run, "--max-steps", "1",
              "train.batch_size=4"]
    assert run_cli(*common) == 0
    assert run_cli(*common) != 0 and "holds a previous run" in capsys.readouterr().err
    assert run_cli(*common, "--overwrite") == 0 and (run / "final" / "README.md").is_file()
    missing = tmp_path / "never"
    assert run_cli("rm", "--model", tiny_model_dir, "--data", tmp_path / "absent.jsonl", "--output-dir", missing) != 0
    assert not missing.exists()
