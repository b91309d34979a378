"""``dpokit online``: rounds of sample, judge, pair, DPO, evaluate. The run records (judge budget accumulated,
one metrics line per round), its refusals, a pairwise judge labelling the pairs, and the deterministic
three-round run, on the tiny random model and on the embedded SmolLM2-135M: a toy reward rises on held-out
prompts, and a run stopped inside round 3 and resumed gives the same round-3 numbers as the uninterrupted run."""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from pathlib import Path

import pytest
from conftest import read_metrics, run_cli

from dpokit.train.online import metrics_lines, round_seed, summary_table


def spaces(prompt: str, completion: str) -> float:
    """The toy reward: spaces in the completion (about one per word-initial token; a tiny random model can learn
    to emit more of them)."""
    return float(completion.count(" "))


PROMPTS = "The film\nI thought\nIts ending\nThe cast\nThe music\nA scene\nThe plot\nOverall\n"
HELD_OUT = "The story\nMy view\nThe acting\n"


def test_metrics_lines_accumulate_the_judge_budget_and_the_summary_shows_every_round():
    records = [{"round": 0, "judge_calls": 0, "eval/reward": 1.0, "eval/reward_stderr": 0.1, "eval/kl": 0.0},
               {"round": 1, "judge_calls": 16, "pairs": 4, "prompts_without_pair": 0, "sample_reward": 0.5,
                "implicit_accuracy_before": None, "eval/reward": 1.5, "eval/kl": 0.2},
               {"round": 2, "judge_calls": 16, "pairs": 3, "prompts_without_pair": 1, "implicit_accuracy_before": 0.75,
                "eval/reward": 2.0, "eval/kl": 0.4}]
    lines = metrics_lines(records)
    assert [ln["judge_calls_total"] for ln in lines] == [0, 16, 32]
    assert [ln["step"] for ln in lines] == [0, 1, 2]
    assert "implicit_accuracy_before" not in lines[1] and lines[2]["implicit_accuracy_before"] == 0.75
    table = summary_table(records).splitlines()
    assert len(table) == 2 + 3 and table[4].startswith("| 2 | 32 |") and "2.000" in table[4]


def test_round_seeds_are_fixed_by_seed_round_and_purpose():
    assert round_seed(0, 1, "sample") == round_seed(0, 1, "sample")
    assert len({round_seed(0, 1, "sample"), round_seed(0, 2, "sample"), round_seed(1, 1, "sample"),
                round_seed(0, 1, "dpo")}) == 4


def test_dpokit_online_refuses_what_it_cannot_do(tmp_path: Path, tiny_model_dir: Path, capsys):
    p = tmp_path / "p.txt"
    p.write_text("x\n")
    out = tmp_path / "run"
    base = ["online", "--model", tiny_model_dir, "--output-dir", out]
    assert run_cli(*base, "--judge", "test_online:spaces") == 2
    assert "needs --prompts" in capsys.readouterr().err
    assert run_cli(*base, "--prompts", p) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert run_cli(*base, "--prompts", p, "--judge-openai", "http://127.0.0.1:9/v1", "-n", "4", "--mode", "rso") == 2
    assert "ranks samples by a reward per sample" in capsys.readouterr().err
    assert run_cli(*base, "--prompts", p, "--judge", "test_online:spaces", "--mode", "rso", "-n", "4",
                   "--rso-samples", "5") == 2
    assert "--rso-samples must be in [2, n=4]" in capsys.readouterr().err
    assert run_cli(*base, "--prompts", p, "--judge", "test_online:spaces", "data.train_files=[a.jsonl]") == 2
    assert "no effect on `dpokit online`" in capsys.readouterr().err
    assert not out.exists()
    # a resume keeps the run's settings: another value is refused, naming it
    out.mkdir()
    (out / "online.json").write_text(json.dumps({"settings": {"prompts": str(p), "rounds": 3, "judge": {}}}))
    assert run_cli(*base, "--prompts", p, "--judge", "test_online:spaces", "--rounds", "5", "--resume") == 2
    assert "--rounds 5: the run in" in capsys.readouterr().err


class LongerWins:
    """A pairwise judge: the longer text wins; equal lengths tie."""

    def __init__(self) -> None:
        self.calls = 0

    def compare(self, prompt: str, a: str, b: str) -> float:
        self.calls += 1
        return 1.0 if len(a) > len(b) else 0.0 if len(b) > len(a) else 0.5


@pytest.mark.slow
def test_one_round_with_a_pairwise_judge_labels_the_pairs_directly(tmp_path: Path, tiny_model_dir: Path):
    from dpokit.config import load_config, set_key
    from dpokit.train.online import OnlineSettings, run_online

    (tmp_path / "p.txt").write_text(PROMPTS)
    (tmp_path / "e.txt").write_text(HELD_OUT)
    cfg = load_config(None, stage="dpo")
    for key, value in (("model.name_or_path", str(tiny_model_dir)), ("output_dir", str(tmp_path / "run")),
                       ("train.batch_size", 2), ("train.lr", 0.1)):
        set_key(cfg, key, value)
    judge = LongerWins()
    settings = OnlineSettings(prompts=str(tmp_path / "p.txt"), eval_prompts=str(tmp_path / "e.txt"), rounds=1,
                              prompts_per_round=4, n=2, mode="random", max_new_tokens=4, eval_samples=1, chat=False)
    result = run_online(cfg, settings, judge)
    r1 = result.rounds[1]
    assert r1["judge_calls"] == 4  # n = 2: one comparison per prompt (no two samples identical here)
    assert r1["pairs"] + sum(r1["pairs_left_out"].values()) == 4
    pairs = [json.loads(ln) for ln in (tmp_path / "run/rounds/round-001/pairs.jsonl").read_text().splitlines()]
    assert all(len(p["chosen"]) > len(p["rejected"]) for p in pairs) and len(pairs) == r1["pairs"]
    # the held-out policy judged against the initial model's samples (None: every comparison a tie)
    assert r1["eval/win_rate"] is None or 0.0 <= r1["eval/win_rate"] <= 1.0
    assert judge.calls == 4 + 3


def _online_args(model: Path, out: Path, tmp: Path, judge: str, per_round: int, n: int,
                 options: tuple[object, ...]) -> list[object]:
    return ["online", "--model", model, "--output-dir", out, "--prompts", tmp / "p.txt", "--eval-prompts",
            tmp / "e.txt", "--judge", f"test_online:{judge}", "--rounds", "3", "--prompts-per-round", per_round, "-n",
            n, *options]


def check_three_rounds_and_resume(tmp: Path, monkeypatch, capsys, model: Path, judge: str, prompts: str,
                                  held_out: str, *, per_round: int, n: int,
                                  options: tuple[object, ...]) -> list[dict]:
    """Three rounds of ``dpokit online`` with the function judge ``test_online:JUDGE``: the held-out reward after
    round 3 exceeds round 0's by more than 3 standard errors; then the same run, stopped inside round 3 (after its
    DPO, before its evaluation) and resumed, gives the uninterrupted round 3's record (but its time) and samples.
    Returns the uninterrupted run's round records."""
    from dpokit.train import online

    (tmp / "p.txt").write_text(prompts)
    (tmp / "e.txt").write_text(held_out)

    def args(out: Path) -> list[object]:
        return _online_args(model, out, tmp, judge, per_round, n, options)

    whole = tmp / "whole"
    assert run_cli(*args(whole)) == 0
    rounds = [json.loads((whole / f"rounds/round-{k:03d}/round.json").read_text()) for k in range(4)]
    r0, r3 = rounds[0], rounds[3]
    gap = 3 * math.hypot(r0["eval/reward_stderr"], r3["eval/reward_stderr"])
    assert r3["eval/reward"] > r0["eval/reward"] + gap, [(r["eval/reward"], r["eval/reward_stderr"]) for r in rounds]
    for r in rounds[1:]:
        assert r["judge_calls"] == r["prompts"] * n and r["prompts"] <= per_round
        assert r["pairs"] + r["prompts_without_pair"] >= r["prompts"] - sum(r["pairs_left_out"].values())
        assert {"sample_reward", "implicit_accuracy_before", "eval/kl", "dpo/loss", "policy", "reference"} <= set(r)
        assert r["reference"] == str(model)  # --reference initial (the default)
    assert rounds[1]["implicit_accuracy_before"] is None and rounds[2]["implicit_accuracy_before"] is not None
    assert [ln["judge_calls_total"] for ln in read_metrics(whole)] == list(accumulate(r["judge_calls"] for r in rounds))

    real = online.Online.evaluate

    def stop_in_round_3(self, k, policy, out):
        if k == 3:
            raise KeyboardInterrupt
        return real(self, k, policy, out)

    cut = tmp / "cut"
    monkeypatch.setattr(online.Online, "evaluate", stop_in_round_3)
    assert run_cli(*args(cut)) == 130
    assert "--resume" in capsys.readouterr().err
    assert not (cut / "rounds/round-003/round.json").exists() and (cut / "rounds/round-003/pairs.jsonl").exists()
    monkeypatch.setattr(online.Online, "evaluate", real)
    assert run_cli("online", "--output-dir", cut, "--resume") == 0
    again = json.loads((cut / "rounds/round-003/round.json").read_text())
    drop = ("seconds",)
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in r3.items() if k not in drop}
    assert (cut / "rounds/round-003/eval_samples.jsonl").read_text() == \
        (whole / "rounds/round-003/eval_samples.jsonl").read_text()
    return rounds


@pytest.mark.slow
def test_three_online_rounds_raise_the_held_out_reward_and_a_resumed_run_matches(tmp_path: Path,
                                                                                    tiny_model_dir: Path,
                                                                                    monkeypatch, capsys):
    check_three_rounds_and_resume(tmp_path, monkeypatch, capsys, tiny_model_dir, "spaces", PROMPTS, HELD_OUT,
                                  per_round=8, n=4, options=("--max-new-tokens", "8", "--no-chat", "train.lr=0.1",
                                                             "train.batch_size=4", "train.epochs=2"))


POSITIVE = ("great", "good", "wonderful", "excellent", "amazing", "best", "beautiful", "beautifully", "fantastic",
            "brilliant", "love", "loved", "fun", "perfect", "enjoyable", "enjoyed", "remarkable", "delightful",
            "stunning", "impressive", "superb", "cool", "masterpiece")


def positive_words(prompt: str, completion: str) -> float:
    """The toy reward on the embedded model: how many words of the completion are in POSITIVE (case-insensitive).
    A count over a short list rather than 1.0 for 'contains great': 'great' alone shows up in too few samples (a
    few percent) to make pairs in every round."""
    return float(sum(w in POSITIVE for w in re.findall(r"[a-z]+", completion.lower())))


# openings that end where a review's adjective goes
REVIEW_OPENINGS = ("The film was so\nThe acting was really\nIt was a truly\nThe music was very\nHonestly, the movie "
                   "was\nThe ending was quite\nThe story is a\nThe plot was pretty\nThis is a really\nThe director "
                   "did a\nThe script was\nI found it\n")
REVIEW_HELD_OUT = ("The cast was really\nThe soundtrack is so\nOverall, the film was\nThe cinematography was very\n"
                   "It is a truly\nThe screenplay was\nThe lead actress did a\nThis movie is a really\n")


@pytest.mark.slow
def test_three_online_rounds_on_the_embedded_model_raise_a_positive_word_count_and_a_resumed_run_matches(
        tmp_path: Path, monkeypatch, capsys):
    """SmolLM2-135M-Instruct (the embedded GGUF, converted once): the same three rounds, on movie-review openings
    continued without the chat template, sampled at temperature 0.7. Seed 42 gives a held-out mean of 0.31 ± 0.09
    positive words at round 0 and 0.69, 0.88, 1.19 ± 0.13 after rounds 1-3 (32 samples each)."""
    from dpokit.demo import embedded_hf_dir

    check_three_rounds_and_resume(tmp_path, monkeypatch, capsys, embedded_hf_dir(), "positive_words",
                                  REVIEW_OPENINGS, REVIEW_HELD_OUT, per_round=8, n=6,
                                  options=("--max-new-tokens", "8", "--no-chat", "--temperature", "0.7",
                                           "--eval-samples", "4", "train.lr=1e-4", "train.batch_size=8",
                                           "train.epochs=2"))
