"""RLOO (``dpokit rl``): the estimator against autograd on a toy categorical policy (each sample's gradient is
(r - beta l - baseline) grad log pi; averaged over every k-tuple of samples it is exactly the gradient of
E[r] - beta KL), and ``dpokit rl`` on a tiny model: its metrics, its refusals, and exact resume."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_cli

from dpokit.train.rl import rloo_advantages, rloo_loss


def test_rloo_advantages_are_leave_one_out_by_hand():
    r = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, -1.0]])
    logratio = torch.tensor([[0.2, -0.1, 0.0], [0.0, 1.0, 0.0]])
    beta = 0.5
    R = [[0.9, 0.05, 2.0], [0.5, 0.0, -1.0]]  # r - beta l
    want = [[R[p][i] - sum(R[p][j] for j in range(3) if j != i) / 2 for i in range(3)] for p in range(2)]
    assert torch.allclose(rloo_advantages(r, logratio, beta), torch.tensor(want), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(r[:, :1], logratio[:, :1], beta)


def _toy(seed: int = 0, v: int = 4):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(v, generator=g, dtype=torch.float64)
    ref = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64), -1)
    reward = torch.randn(v, generator=g, dtype=torch.float64)
    return theta, ref, reward


def test_each_samples_gradient_is_its_advantage_times_grad_log_pi_against_autograd():
    """A categorical policy pi = softmax(theta) over 4 'sequences'; 2 prompts x k = 3 samples. The gradient of the
    summed loss / N equals -(1/N) sum_i (r_i - beta l_i - b_i) grad log pi(y_i), grad log pi(y) = e_y - pi
    (by hand, not by autograd), b_i the mean of the other samples' r - beta l."""
    theta, ref, reward = _toy()
    beta, k = 0.3, 3
    ys = [0, 2, 2, 1, 3, 0]
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    logps = logp[ys]
    losses, adv, logratio = rloo_loss(logps, ref[ys], reward[ys], k, beta)
    (losses.sum() / len(ys)).backward()
    pi = torch.softmax(theta.detach(), -1)
    want = torch.zeros_like(pi)
    for p in range(2):
        group = ys[p * k:(p + 1) * k]
        total = [float(reward[y] - beta * (logp[y].detach() - ref[y])) for y in group]
        for i, y in enumerate(group):
            baseline = (sum(total) - total[i]) / (k - 1)
            want -= (total[i] - baseline) * (torch.nn.functional.one_hot(torch.tensor(y), 4).double() - pi)
    want /= len(ys)
    assert torch.allclose(theta.grad, want, atol=1e-12)
    assert torch.allclose(logratio, (logp[ys] - ref[ys]).detach().float())


@pytest.mark.parametrize("k", [2, 3])
def test_the_expected_rloo_gradient_is_the_gradient_of_reward_minus_beta_kl(k):
    """Enumerate every k-tuple of samples (v^k of them) with its probability: the expected estimator equals the
    exact gradient of E_pi[r] - beta KL(pi || pi_ref), computed by autograd on the closed form. It fails without
    the KL term or with the sample's own reward in its baseline."""
    theta, ref, reward = _toy(1)
    beta, v = 0.7, theta.numel()

    def expected(estimator_beta: float, own_in_baseline: bool = False) -> torch.Tensor:
        total = torch.zeros(v, dtype=torch.float64)
        pi = torch.softmax(theta, -1)
        for ys in itertools.product(range(v), repeat=k):
            th = theta.clone().requires_grad_(True)
            logps = torch.log_softmax(th, -1)[list(ys)]
            losses, adv, _ = rloo_loss(logps, ref[list(ys)], reward[list(ys)], k, estimator_beta)
            if own_in_baseline:  # a biased variant: the plain mean as baseline (kept as a counter-example)
                lr = (logps.detach() - ref[list(ys)])
                tot = reward[list(ys)] - estimator_beta * lr
                losses = -(tot - tot.mean()) * logps
            (losses.sum() / k).backward()
            total -= float(torch.prod(pi[list(ys)])) * th.grad  # the ascent direction
        return total

    th = theta.clone().requires_grad_(True)
    pi, logpi = torch.softmax(th, -1), torch.log_softmax(th, -1)
    objective = (pi * reward).sum() - beta * (pi * (logpi - ref)).sum()
    (exact,) = torch.autograd.grad(objective, th)
    assert torch.allclose(expected(beta), exact, atol=1e-10)
    assert not torch.allclose(expected(0.0), exact, atol=1e-3)
    assert not torch.allclose(expected(beta, own_in_baseline=True), exact, atol=1e-3)


def spaces(prompt: str, completion: str) -> float:
    return float(completion.count(" "))


def _rl_args(model: Path, out: Path, prompts: Path, *extra: object) -> list[object]:
    return ["rl", "--model", model, "--output-dir", out, "--prompts", prompts, "--judge", "test_rl:spaces",
            "-k", "3", "--max-new-tokens", "4", "--no-chat", "train.batch_size=2", "train.lr=1e-2", "--max-steps",
            "4", "--save-steps", "2", *extra]


@pytest.mark.slow
def test_dpokit_rl_logs_reward_kl_entropy_and_resumes_exactly(tmp_path: Path, tiny_model_dir: Path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The film\nI thought\nIts ending\nThe cast\n")
    whole = tmp_path / "whole"
    assert run_cli(*_rl_args(tiny_model_dir, whole, prompts)) == 0
    rows = read_metrics(whole)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["kl"] == 0.0  # the first step samples from the reference itself
    for r in steps:
        assert {"reward", "kl", "objective", "entropy"} <= set(r)
        assert r["objective"] == pytest.approx(r["reward"] - 0.1 * r["kl"], abs=1e-5)
    assert json.loads((whole / "rl.json").read_text())["k"] == 3
    # a run stopped after step 2 (its checkpoint kept, nothing after it) and resumed: the same numbers
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-4")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= 2))
    assert run_cli(*_rl_args(tiny_model_dir, cut, prompts, "--resume")) == 0
    again = [r for r in read_metrics(cut) if "loss" in r]
    for a, b in zip(steps, again):
        assert {k: a[k] for k in ("loss", "reward", "kl", "entropy")} == {k: b[k] for k in ("loss", "reward", "kl",
                                                                                          "entropy")}
    assert len(again) == 4


def test_dpokit_rl_refuses_what_it_cannot_do(tmp_path: Path, tiny_model_dir: Path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    out = tmp_path / "run"
    assert run_cli(*_rl_args(tiny_model_dir, out, prompts, "-k", "1")) == 2
    assert "-k must be >= 2" in capsys.readouterr().err
    assert run_cli(*_rl_args(tiny_model_dir, out, prompts, "loss.name=ipo")) == 2
    assert "has no effect on `dpokit rl`" in capsys.readouterr().err
    assert run_cli("rl", "--model", tiny_model_dir, "--output-dir", out, "--prompts", prompts) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert run_cli("rl", "--model", tiny_model_dir, "--output-dir", out, "--prompts", prompts, "--judge-openai",
                   "http://127.0.0.1:9/v1") == 2
    assert "reward per sample" in capsys.readouterr().err
    assert not out.exists()


def digit(prompt: str, completion: str) -> float:
    return 1.0 if completion.strip().isdigit() else 0.0


TOY_PROMPTS = ["!#$%", "(", "?", "&*"]  # ids below 64: the tiny vocabulary's punctuation


def _next_token_logps(model_dir: Path, tokenizer, prompts: list[str]) -> torch.Tensor:
    """log pi(y | x) [P, V] of one-token completions y under the model saved at ``model_dir``."""
    from transformers import AutoModelForCausalLM

    from dpokit.eval.sampling import prompt_ids

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        return torch.stack([torch.log_softmax(model(torch.tensor([prompt_ids(tokenizer, p)])).logits[0, -1], -1)
                            for p in prompts])


def test_dpokit_rl_lands_on_the_kl_regularized_optimum_of_a_one_token_task(tmp_path: Path, tokenizer_dir: Path):
    """``dpokit rl`` end to end (sampling, judge, KL-in-reward, leave-one-out, the optimizer) on a task small enough
    to converge: a tiny model whose 64-token vocabulary is the tokenizer's first 64 ids, one new token per prompt,
    reward 1 for a digit. pi*_beta ∝ pi_ref exp(r / beta) is exact over the vocabulary; RLOO must close most of
    the gap in J = E[r] - beta KL(pi || pi_ref), which is beta * KL(pi || pi*_beta) (Rafailov et al. 2023, App. A.1),
    and land on pi*'s reward and KL."""
    from conftest import save_tiny_vocab

    from dpokit.eval.sampling import prompt_ids

    model_dir = tmp_path / "tiny64"
    tokenizer = save_tiny_vocab(model_dir, tokenizer_dir)
    assert all(max(prompt_ids(tokenizer, p)) < 64 for p in TOY_PROMPTS)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(p + "\n" for p in TOY_PROMPTS))
    beta, out = 0.5, tmp_path / "rl"
    assert run_cli("rl", "--model", model_dir, "--output-dir", out, "--prompts", prompts, "--judge",
                   "test_rl:digit", "-k", "8", "--max-new-tokens", "1", "--no-chat", "--beta", beta,
                   "train.batch_size=4", "train.lr=3e-2", "--max-steps", "150", "--save-steps", "1000") == 0
    reward = torch.tensor([digit("", tokenizer.decode([i], skip_special_tokens=True)) for i in range(64)],
                          dtype=torch.float64)
    ref = _next_token_logps(model_dir, tokenizer, TOY_PROMPTS)
    star = torch.log_softmax(ref + reward / beta, -1)
    pi = _next_token_logps(out / "final", tokenizer, TOY_PROMPTS)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # KL(p || q) per prompt, from log-probs
        return (p.exp() * (p - q)).sum(-1)

    gap_before, gap_after = kl(ref, star), kl(pi, star)
    assert (gap_after < 0.05 * gap_before).all(), (gap_before, gap_after)
    r_pi, r_star = (pi.exp() * reward).sum(-1), (star.exp() * reward).sum(-1)
    assert torch.allclose(r_pi, r_star, atol=0.03), (r_pi, r_star)
    assert torch.allclose(kl(pi, ref), kl(star, ref), atol=0.05), (kl(pi, ref), kl(star, ref))
