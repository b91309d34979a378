"""Pairing modes: best-worst, all-pairs, random, RSO's statistical rejection sampling (its acceptance law against
exp((r - r_max) / beta) / Z), Bradley-Terry labels (against sigma((r_a - r_b) / tau)), the pairwise judge, and
`dpokit pairs` with each."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from dpokit.eval.pairing import (
    RSO,
    AllPairs,
    BestWorst,
    BradleyTerry,
    RandomPairs,
    check_pairwise_mode,
    pair_judged,
    pair_scored,
    prompt_rng,
    rejection_sample,
)


@dataclass(frozen=True)
class S:
    prompt_index: int
    text: str


def tilted(rewards, beta):
    """exp((r - r_max) / beta) / Z: the law RSO's first acceptance must follow."""
    top = max(rewards)
    w = [math.exp((r - top) / beta) for r in rewards]
    return [x / sum(w) for x in w]


def within(freq: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(freq - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


def test_rso_acceptance_frequencies_match_the_tilted_distribution_on_a_toy_reward():
    rewards, beta, n = [0.0, 0.3, 1.0, -0.5, 0.8, 1.0], 0.4, 40_000
    rng = random.Random(0)
    first, trials = Counter(), []
    for _ in range(n):
        first[rejection_sample(rewards, 1, beta, rng, trials)[0]] += 1
    want = tilted(rewards, beta)
    for i, p in enumerate(want):
        assert within(first[i] / n, p, n), (i, first[i] / n, p)
    # each proposal of candidate i is accepted with probability exp((r_i - r_max) / beta)
    proposed, accepted = Counter(), Counter()
    for i, ok in trials:
        proposed[i] += 1
        accepted[i] += ok
    for i, r in enumerate(rewards):
        p = math.exp((r - max(rewards)) / beta)
        assert within(accepted[i] / proposed[i], p, proposed[i]), (i, accepted[i] / proposed[i], p)
    # the law can fail: against the untilted (uniform) distribution it does
    assert not all(within(first[i] / n, 1 / len(rewards), n) for i in range(len(rewards)))


@settings(max_examples=12, derandomize=True, deadline=None)
@given(rewards=st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=5),
       beta=st.floats(0.25, 3.0))
def test_rso_draws_without_replacement_from_the_tilted_distribution(rewards, beta):
    """Two acceptances: the ordered pair (i, j) has probability p_i * p_j / (1 - p_i), p the tilted law over all
    candidates (the second draw is the tilted law over those left: Eq. 17 with r_max recomputed)."""
    n, rng = 6000, random.Random(1)
    seen = Counter(tuple(rejection_sample(rewards, 2, beta, rng)) for _ in range(n))
    p = tilted(rewards, beta)
    for i in range(len(rewards)):
        for j in range(len(rewards)):
            if i != j:
                want = p[i] * p[j] / (1 - p[i])
                assert within(seen[(i, j)] / n, want, n), ((i, j), seen[(i, j)] / n, want)
    assert sum(seen.values()) == n and all(i != j for i, j in seen)


def test_rso_pairs_are_labelled_by_the_reward_and_beta_to_zero_keeps_the_best():
    rewards = [0.1, 0.9, 0.5, 0.2]
    rng = random.Random(3)
    for _ in range(200):
        for w, lo in RSO(beta=0.3, m=4).pairs(rewards, rng):
            assert rewards[w] > rewards[lo]
    # a tiny beta accepts in reward order: the pair is the two best, best first
    assert RSO(beta=1e-4, m=2).pairs(rewards, rng) == [(1, 2)]
    with pytest.raises(ValueError, match="beta > 0"):
        RSO(beta=0.0)


def test_bradley_terry_labels_follow_sigmoid_of_the_reward_difference():
    rewards, tau, n = [0.8, 0.2], 0.5, 20_000
    wins = sum(BradleyTerry(tau).pairs(rewards, prompt_rng(0, i)) == [(0, 1)] for i in range(n))
    p = 1 / (1 + math.exp(-(0.8 - 0.2) / tau))
    assert within(wins / n, p, n)
    # equal rewards: a fair coin; pairs are formed as drawn (0,1), (2,3); an odd last sample is left alone
    got = [BradleyTerry(1.0).pairs([0.5, 0.5, 0.1], prompt_rng(0, i)) for i in range(4000)]
    assert all(len(g) == 1 and set(g[0]) == {0, 1} for g in got)
    assert within(sum(g[0] == (0, 1) for g in got) / 4000, 0.5, 4000)


def test_deterministic_modes_on_a_hand_made_prompt():
    rewards = [0.2, 0.9, 0.2, -0.4, 0.9]
    rng = random.Random(0)
    # ranked (stable): 1, 4, 0, 2, 3
    assert BestWorst(1).pairs(rewards, rng) == [(1, 3)]
    assert BestWorst(3).pairs(rewards, rng) == [(1, 3), (4, 2)]  # the 3rd pair would be 0 vs 0: only 2 pairs
    assert AllPairs().pairs(rewards, rng) == [(1, 0), (1, 2), (1, 3), (4, 0), (4, 2), (4, 3), (0, 3), (2, 3)]
    assert RandomPairs().pairs(rewards, rng) == [(1, 0), (2, 3)]  # (0,1), (2,3); the 5th sample is left alone
    assert RandomPairs().pairs([0.2, 0.2, 0.9, -0.4], rng) == [(2, 3)]  # a tie makes no pair
    assert RandomPairs().pairs([0.3, 0.3], rng) == []


def test_pair_scored_counts_what_it_leaves_out():
    samples = [S(0, "good"), S(0, "good"), S(1, "a"), S(1, "b"), S(2, " "), S(2, "x")]
    scores = [1.0, 0.0, 0.5, 0.5, 1.0, 0.0]
    result = pair_scored(samples, scores, ["p0", "p1", "p2"], BestWorst(1))
    assert result.records == []
    assert result.prompts_without_pair == 3
    assert result.dropped == Counter({"identical texts": 1, "empty text": 1})
    result = pair_scored([S(0, "fine"), S(0, "great")], [0.1, 0.7], ["p"], BestWorst(1))
    assert result.records == [{"prompt": "p", "chosen": "great", "rejected": "fine", "chosen_score": 0.7,
                               "rejected_score": 0.1}]


def test_pairs_of_a_prompt_do_not_depend_on_the_other_prompts():
    a = [S(0, f"a{i}") for i in range(6)] + [S(1, f"b{i}") for i in range(6)]
    scores = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3] * 2
    both = pair_scored(a, scores, ["x", "y"], RSO(0.3, 4), seed=7).records
    alone = pair_scored(a[6:], scores[6:], ["x", "y"], RSO(0.3, 4), seed=7).records
    assert [r for r in both if r["prompt"] == "y"] == alone


class FakePairwise:
    """Prefers the longer text; 'tie' when equally long; None (a failure) when a text says so."""

    def __init__(self):
        self.calls = 0

    def compare(self, prompt, a, b):
        self.calls += 1
        if "fail" in a + b:
            return None
        return 1.0 if len(a) > len(b) else 0.0 if len(b) > len(a) else 0.5


def test_a_pairwise_judge_labels_each_pair_directly():
    samples = [S(0, "short"), S(0, "much longer"), S(1, "same"), S(1, "sama"), S(2, "fail"), S(2, "ok"),
               S(3, "x"), S(3, "x")]
    judge = FakePairwise()
    result = pair_judged(samples, ["p0", "p1", "p2", "p3"], judge, "random", max_invalid=0.5)
    assert result.records == [{"prompt": "p0", "chosen": "much longer", "rejected": "short", "judgement": 1.0}]
    assert result.comparisons == judge.calls == 3  # identical texts are never sent
    assert result.dropped == Counter({"identical texts": 1, "judge failed": 1, "tie (the two orders disagree)": 1})
    assert result.prompts_without_pair == 3
    many = [S(0, "a"), S(0, "bbb"), S(0, "cc")]
    assert len(pair_judged(many, ["p"], FakePairwise(), "all-pairs").records) == 3
    assert len(pair_judged(many, ["p"], FakePairwise(), "random").records) == 1


def test_pairwise_modes_are_checked():
    assert check_pairwise_mode("best-worst", 2) == "random"
    assert check_pairwise_mode("all-pairs", 5) == "all-pairs"
    for mode in ("best-worst", "rso", "bt"):
        with pytest.raises(ValueError, match="pairwise judge"):
            check_pairwise_mode(mode, 4)


def length_judge(prompt: str, completion: str) -> float:
    return float(len(completion))


@pytest.mark.parametrize("extra", [["--mode", "rso", "--rso-samples", "2", "--rso-beta", "3"],
                                   ["--mode", "bt", "--bt-tau", "2"], ["--mode", "random"]])
def test_dpokit_pairs_with_each_mode(tmp_path: Path, tiny_model_dir: Path, extra, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The film\nI thought\nIts ending\n")
    out = tmp_path / "pairs.jsonl"
    assert run_cli("pairs", "--model", tiny_model_dir, "--prompts", prompts, "--judge", "test_pairing:length_judge",
                   "-n", "4", "--max-new-tokens", "5", "--out", out, *extra) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert rows and "prompts made no pair" in capsys.readouterr().out
    if "bt" not in extra:
        assert all(r["chosen_score"] > r["rejected_score"] for r in rows)


def test_dpokit_pairs_refuses_a_ranking_mode_with_a_pairwise_judge(tmp_path, tiny_model_dir, capsys):
    p = tmp_path / "p.txt"
    p.write_text("x\n")
    assert run_cli("pairs", "--model", tiny_model_dir, "--prompts", p, "--judge-openai", "http://127.0.0.1:9/v1",
                   "-n", "4", "--mode", "rso", "--out", tmp_path / "o.jsonl") == 2
    assert "--mode rso ranks samples by a reward per sample" in capsys.readouterr().err


def test_dpokit_pairs_with_an_openai_compatible_judge(tmp_path: Path, tiny_model_dir: Path, capsys):
    """A loopback endpoint that prefers the longer response: with n = 2 it labels the one pair directly, both
    orders asked (two requests per pair)."""
    import http.server
    import re
    import threading

    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][0]["content"]
            a = re.search(r"Response A:\n(.*)\n\nResponse B:", text, re.S).group(1)
            b = re.search(r"Response B:\n(.*)$", text, re.S).group(1)
            requests.append((a, b))
            reply = json.dumps({"choices": [{"message": {"content": "A" if len(a) >= len(b) else "B"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prompts = tmp_path / "p.txt"
        prompts.write_text("The film\nI thought\nIts ending\nThe cast\n")
        out = tmp_path / "pairs.jsonl"
        assert run_cli("pairs", "--model", tiny_model_dir, "--prompts", prompts, "--judge-openai",
                       f"http://127.0.0.1:{server.server_address[1]}/v1", "-n", "2", "--max-new-tokens", "6",
                       "--out", out) == 0
    finally:
        server.shutdown()
        server.server_close()
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    printed = capsys.readouterr().out
    decided = [r for r in rows]
    assert all(len(r["chosen"]) > len(r["rejected"]) for r in decided)  # equal lengths: a tie, no pair
    m = re.search(r"; (\d+) pairwise comparisons", printed)
    assert m and len(requests) == 2 * int(m.group(1)) and int(m.group(1)) <= 4
    assert (tmp_path / "pairs.jsonl.judgements.jsonl").is_file()


def test_dpo_on_bradley_terry_labels_recovers_the_optimum_at_tau_beta():
    """On a toy categorical policy (4 'responses', all pairs drawn from pi_ref), DPO at beta (dpokit's sigmoid loss)
    on labels drawn by ``BradleyTerry(tau)`` converges to pi*_{tau beta} ∝ pi_ref exp(r / (tau beta)): the BT
    reward is r / tau, and DPO's minimizer has beta log(pi / pi_ref) = r / tau + const. The optimum at beta alone
    (ignoring tau) is far from it."""
    import torch

    from dpokit.losses import sigmoid_loss

    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(4, generator=g, dtype=torch.float64), -1)
    r = [0.0, 0.4, 1.0, -0.6]
    tau, beta, n = 0.5, 1.0, 40_000
    draws = torch.multinomial(ref.exp(), 2 * n, replacement=True, generator=g).view(n, 2).tolist()
    wins, bt, rng = Counter(), BradleyTerry(tau), random.Random(0)  # (winner, loser) -> pairs
    for a, b in draws:
        if a != b:
            (w, lo), = bt.pairs([r[a], r[b]], rng)
            wins[((a, b)[w], (a, b)[lo])] += 1
    keys = sorted(wins)
    chosen_t, rejected_t = torch.tensor([k[0] for k in keys]), torch.tensor([k[1] for k in keys])
    weight = torch.tensor([wins[k] for k in keys], dtype=torch.float64)
    theta = ref.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure():  # the mean DPO loss over every labelled pair (identical pairs counted once, weighted)
        opt.zero_grad()
        logp = torch.log_softmax(theta, -1)
        losses, _, _ = sigmoid_loss(logp[chosen_t], logp[rejected_t], ref[chosen_t], ref[rejected_t], beta=beta)
        loss = (weight * losses).sum() / weight.sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    pi = torch.softmax(theta.detach(), -1)
    target = torch.softmax(ref + torch.tensor(r, dtype=torch.float64) / (tau * beta), -1)
    wrong = torch.softmax(ref + torch.tensor(r, dtype=torch.float64) / beta, -1)
    assert torch.allclose(pi, target, atol=0.02), (pi, target)
    assert (pi - wrong).abs().max() > 0.05


def test_dpokit_dpo_on_bradley_terry_labels_fits_the_reward_over_tau_on_a_one_token_task(tmp_path: Path,
                                                                                        tokenizer_dir: Path):
    """The same theory through ``dpokit dpo`` end to end (pairs file, tokenization, reference, the loop): a tiny
    model whose vocabulary is the tokenizer's first 64 ids, prompt "A", one-token completions y (each followed by
    EOS, as the data pipeline writes it) drawn from pi_ref over 32 punctuation and digit tokens, reward 1 for a
    digit, labels by ``BradleyTerry(tau)``. DPO's minimizer has beta * log(pi(y) / pi_ref(y)) = r(y) / tau + const,
    so the digits' mean log-ratio exceeds the others' by 1 / (tau beta), which is pi*_{tau beta} on this support;
    ignoring tau would give 1 / beta."""
    import torch
    from conftest import save_tiny_vocab
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "tiny64"
    tokenizer = save_tiny_vocab(model_dir, tokenizer_dir)
    support = list(range(17, 49))  # '!' .. '@': each stays one token after "A" (checked below)
    assert all(tokenizer.encode("A" + tokenizer.decode([i])) == [49, i] for i in support)
    reward = torch.tensor([1.0 if tokenizer.decode([i]).isdigit() else 0.0 for i in support], dtype=torch.float64)
    assert int(reward.sum()) == 10
    eos = tokenizer.eos_token_id

    def seq_logps(path: Path) -> torch.Tensor:  # log pi(y, EOS | "A") [len(support)]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        ids = torch.tensor([[49, i, eos] for i in support])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits, -1)
        return logp[:, 0].gather(1, ids[:, 1:2])[:, 0] + logp[:, 1, eos]

    ref = seq_logps(model_dir)
    g = torch.Generator().manual_seed(0)
    tau, beta, n = 0.5, 1.0, 3000
    draws = torch.multinomial(torch.softmax(ref, -1), 2 * n, replacement=True, generator=g).view(n, 2).tolist()
    bt, rng, records = BradleyTerry(tau), random.Random(0), []
    for a, b in draws:
        if a != b:
            (w, lo), = bt.pairs([float(reward[a]), float(reward[b])], rng)
            records.append({"prompt": "A", "chosen": tokenizer.decode([support[(a, b)[w]]]),
                            "rejected": tokenizer.decode([support[(a, b)[lo]]])})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "dpo"
    assert run_cli("dpo", "--model", model_dir, "--data", data, "--output-dir", out, "--beta", beta,
                   "train.epochs=4", "train.batch_size=64", "train.lr=1e-2", "precision=fp32") == 0
    h = seq_logps(out / "final") - ref  # log pi / pi_ref of each (y, EOS)
    digits, others = h[reward == 1].mean(), h[reward == 0].mean()
    assert float(digits - others) == pytest.approx(1 / (tau * beta), abs=0.25), h
