"""``dpokit eval`` and ``dpokit pairs``: did alignment work, and on-policy data to make it work.

Preference-set evaluation (no sampling): for every pair, log pi(y_w|x), log pi(y_l|x) (summed and
per-token mean) and, with a reference, the implicit rewards r = beta (log pi - log pi_ref):
reward accuracy P(r_w > r_l), mean margin, and log-prob accuracy without a reference.

Generation evaluation (sampling): n samples per prompt from policy and reference with the same
seeds; a judge scores or compares them: win rate of policy over reference (ties separate, Wilson
interval), mean reward of each, and KL(policy || reference) estimated from the policy's samples.
The samples are written before any judging (``OUT/samples.jsonl``) and each pairwise judgement as it
is made (``OUT/judgements.jsonl``), so a judge that fails keeps the sampling work. A pairwise judge
may fail on at most ``max_invalid`` (a fraction) of the comparisons; past that, evaluation stops
with ``JudgeError`` naming the last failure instead of reporting a win rate over the few that worked.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dpokit.config import Config
from dpokit.data.collate import layout, pair_sequences
from dpokit.data.formats import DataError, Text, load_preferences, parse_json
from dpokit.data.tokenize import TokenizeReport, tokenize_pair
from dpokit.eval.judges import JudgeError, PairwiseJudge, RewardJudge, RewardPairwise
from dpokit.eval.pairing import (
    Pairing,
    PairingResult,
    check_pairwise_mode,
    make_pairing,
    pair_judged,
    pair_scored,
    prompt_text,
)
from dpokit.eval.sampling import Sample, kl_from_logps, sample, score
from dpokit.eval.stats import mean_stderr, win_rate
from dpokit.logprobs import LogProbs
from dpokit.models import autocast
from dpokit.progress import Progress

log = logging.getLogger("dpokit")


def read_prompts(path: str, flag: str = "--prompts") -> list[str]:
    """One prompt per line of a text file, or the 'prompt' field of each JSONL record; DataError (file and line)
    for a directory, a missing file, text that is not UTF-8, a bad JSONL line, or a file without prompts."""
    p = Path(path)
    what = "a text file (one prompt per line) or JSONL with a 'prompt' field"
    if p.is_dir():
        raise DataError(f"{p}: a directory; {flag} takes {what}", kind="structure")
    if not p.is_file():
        raise DataError(f"{p}: no such file ({flag} takes {what})", kind="structure")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})", kind="structure") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (byte {e.start}); {flag} takes {what}", kind="invalid_text") from None
    numbered = [(n, ln) for n, ln in enumerate(text.split("\n"), start=1) if ln.strip()]
    if not numbered:
        raise DataError(f"{p}: no prompts (the file is empty)", kind="no_records")
    if p.suffix != ".jsonl":
        return [ln.rstrip("\r") for _, ln in numbered]
    out = []
    for n, ln in numbered:
        rec, why = parse_json(ln, single_line=True)
        if why is not None:
            raise DataError(f"{p}:line {n}: not valid JSON ({why})", kind="invalid_json")
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise DataError(f"{p}:line {n}: field 'prompt': expected an object with a string 'prompt'",
                            kind="missing_field")
        out.append(rec["prompt"])
    return out


@torch.no_grad()
def preference_eval(
    policy: Any, tokenizer: Any, files: list[str], *, reference: Any = None, beta: float = 0.1,
    batch_size: int = 8, max_length: int | None = None, max_prompt_length: int | None = None,
    device: torch.device | None = None,
    precision: str = "fp32", out: Path | None = None,
) -> dict[str, Any]:
    device = device or next(policy.parameters()).device
    defaults = Config()
    max_length = max_length or defaults.data.max_length
    max_prompt_length = max_prompt_length or max_length // 2
    report = TokenizeReport()
    pairs = [p for ex in load_preferences(files) if (p := tokenize_pair(
        tokenizer, ex, max_length=max_length, max_prompt_length=max_prompt_length, report=report)) is not None]
    rows: list[dict[str, Any]] = []
    policy_lp = LogProbs(policy)
    reference_lp = LogProbs(reference) if reference is not None else None
    with Progress("preference eval", total=len(pairs), unit="pair") as bar:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            b = layout(pair_sequences(chunk, range(len(chunk)))[0], "auto", tokenizer.pad_token_id).to(device)
            with autocast(device, precision):
                sums, lengths = policy_lp(b)
                ref_sums = reference_lp(b)[0] if reference_lp is not None else None
            pc, pr = sums.float().cpu().chunk(2)
            lc, lr = lengths.cpu().chunk(2)
            rc, rr = ref_sums.float().cpu().chunk(2) if ref_sums is not None else (None, None)
            for j, pair in enumerate(chunk):
                row: dict[str, Any] = {
                    "source": pair.source, "logp_chosen": pc[j].item(), "logp_rejected": pr[j].item(),
                    "mean_logp_chosen": pc[j].item() / max(1, int(lc[j])),
                    "mean_logp_rejected": pr[j].item() / max(1, int(lr[j])),
                }
                if rc is not None:
                    row["reward_chosen"] = beta * (pc[j] - rc[j]).item()
                    row["reward_rejected"] = beta * (pr[j] - rr[j]).item()
                    row["margin"] = row["reward_chosen"] - row["reward_rejected"]
                rows.append(row)
            bar.update(len(chunk))
    n = len(rows)
    summary: dict[str, Any] = {
        "pairs": n, "tokenization": report.to_dict(),
        "logps_accuracy": sum(r["logp_chosen"] > r["logp_rejected"] for r in rows) / n if n else float("nan"),
        "mean_logps_accuracy": sum(r["mean_logp_chosen"] > r["mean_logp_rejected"] for r in rows) / n
        if n else float("nan"),
    }
    if reference is not None and n:
        summary.update({
            "beta": beta,
            "rewards/accuracies": sum(r["margin"] > 0 for r in rows) / n,
            "rewards/margins": sum(r["margin"] for r in rows) / n,
            "rewards/chosen": sum(r["reward_chosen"] for r in rows) / n,
            "rewards/rejected": sum(r["reward_rejected"] for r in rows) / n,
        })
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return summary


def _write_samples(out: Path, texts: Sequence[str], pol: Sequence[Sample], ref: Sequence[Sample],
                   scores: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
    """OUT/samples.jsonl, written whole (a temporary file renamed into place)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "samples.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for i, (a, b) in enumerate(zip(pol, ref)):
            row: dict[str, Any] = {"prompt": texts[a.prompt_index], "policy": a.text, "reference": b.text}
            if scores is not None:
                row.update(reward_policy=scores[0][i], reward_reference=scores[1][i])
            f.write(json.dumps(row) + "\n")
    tmp.replace(out / "samples.jsonl")


def judge_pairs(pairwise: PairwiseJudge, items: Sequence[tuple[str, str, str]], *, max_invalid: float = 0.1,
                log_path: Path | None = None) -> list[float | None]:
    """``pairwise.compare(prompt, a, b)`` for each item; None is an invalid judgement.

    At most ``floor(max_invalid * len(items))`` invalid judgements are tolerated: one more stops the
    run with ``JudgeError`` (the judge's last error named) rather than a win rate over what is left.
    Each judgement is appended to ``log_path`` (JSONL) as it is made.
    """
    allowed = int(max_invalid * len(items))
    outcomes: list[float | None] = []
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(log_path.open("w", encoding="utf-8")) if log_path is not None else None
        bar = stack.enter_context(Progress("pairwise judging", total=len(items), unit="pair"))
        for i, (prompt, a, b) in enumerate(items):
            outcome = pairwise.compare(prompt, a, b)
            outcomes.append(outcome)
            bar.update(1)
            if f is not None:
                f.write(json.dumps({"index": i, "judgement": outcome}) + "\n")
                f.flush()
            invalid = sum(o is None for o in outcomes)
            if invalid > allowed:
                why = getattr(pairwise, "last_error", "") or "the judge gave no valid answer"
                raise JudgeError(
                    f"the judge failed on {invalid} of the {len(outcomes)} comparisons made so far (of "
                    f"{len(items)}); at most {allowed} may fail (--judge-max-invalid {max_invalid:g}). "
                    f"Last failure: {why}"
                    + (f". Kept: the samples ({log_path.parent / 'samples.jsonl'}) and the judgements made "
                       f"({log_path})" if log_path is not None else ""))
    return outcomes


def generation_eval(
    policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[Text], *, judge: RewardJudge | None = None,
    pairwise: PairwiseJudge | None = None, n: int = 4, max_new_tokens: int = 64, temperature: float = 1.0,
    seed: int = 0, device: torch.device | None = None, precision: str = "fp32", out: Path | None = None,
    max_invalid: float = 0.1,
) -> dict[str, Any]:
    """Sample from both, judge, estimate KL. ``judge`` (reward) or ``pairwise`` decides the win rate;
    a pairwise judge may fail on at most ``max_invalid`` of the comparisons (see ``judge_pairs``)."""
    device = device or next(policy.parameters()).device
    gen = {"n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "device": device,
           "precision": precision}
    pol = sample(policy, tokenizer, prompts, seed=seed, what="sampling from the policy", **gen)
    ref = sample(reference, tokenizer, prompts, seed=seed, what="sampling from the reference", **gen)
    texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    if out is not None:  # before any judging: a judge that fails does not lose the samples
        _write_samples(out, texts, pol, ref)
    result: dict[str, Any] = {"prompts": len(prompts), "samples_per_prompt": n}
    pol_scores = ref_scores = None
    if judge is not None:
        pol_scores = judge.score([texts[s.prompt_index] for s in pol], [s.text for s in pol])
        ref_scores = judge.score([texts[s.prompt_index] for s in ref], [s.text for s in ref])
        for name, scores in (("policy", pol_scores), ("reference", ref_scores)):
            m, se = mean_stderr(scores)
            result[f"reward_{name}"], result[f"reward_{name}_stderr"] = m, se
        pairwise = pairwise or RewardPairwise(judge)
    if pairwise is not None:
        if pol_scores is not None and isinstance(pairwise, RewardPairwise) and pairwise.judge is judge:
            outcomes: list[float | None] = [1.0 if a > b else 0.0 if b > a else 0.5
                                            for a, b in zip(pol_scores, ref_scores)]
        else:
            items = [(texts[a.prompt_index], a.text, b.text) for a, b in zip(pol, ref)]
            outcomes = judge_pairs(pairwise, items, max_invalid=max_invalid,
                                   log_path=out / "judgements.jsonl" if out is not None else None)
            if hasattr(pairwise, "stats"):
                result["judge"] = dict(pairwise.stats)
        result["win_rate"] = win_rate(outcomes).to_dict()
    kl = policy_kl(policy, reference, pol, tokenizer.pad_token_id, device, precision)
    result["kl"] = asdict(kl)
    if out is not None and pol_scores is not None and ref_scores is not None:
        _write_samples(out, texts, pol, ref, (pol_scores, ref_scores))
    return result


def policy_kl(policy: Any, reference: Any, samples: Sequence[Sample], pad_id: int, device: torch.device,
              precision: str):
    """KL(policy || reference) from samples drawn from the policy."""
    lp = score(policy, samples, pad_id=pad_id, device=device, precision=precision, what="KL: scoring under the policy")
    lr = score(reference, samples, pad_id=pad_id, device=device, precision=precision,
               what="KL: scoring under the reference")
    return kl_from_logps(lp, lr, [len(s.completion_ids) for s in samples])


def build_pairs(samples: Sequence[Sample], scores: Sequence[float], prompts: Sequence[Text],
                mode: str = "best-worst", pairs_per_prompt: int = 1) -> tuple[list[dict[str, Any]], int]:
    """Rank each prompt's samples by score; 'best-worst' pairs the k-th best with the k-th worst,
    'all-pairs' every strictly ordered pair. A prompt whose samples all tie yields nothing and is counted.
    (The deterministic modes of ``dpokit.eval.pairing``; ``pair_scored`` takes every mode.)"""
    result = pair_scored(samples, scores, prompts, make_pairing(mode, pairs_per_prompt=pairs_per_prompt))
    return result.records, result.prompts_without_pair


def make_pairs(model: Any, tokenizer: Any, prompts: Sequence[Text], judge: RewardJudge | None = None, *,
               n: int = 8, mode: str = "best-worst", pairs_per_prompt: int = 1, max_new_tokens: int = 64,
               temperature: float = 1.0, seed: int = 0, device: torch.device | None = None,
               precision: str = "fp32", pairing: Pairing | None = None, pairwise: PairwiseJudge | None = None,
               max_invalid: float = 0.1, log_path: Path | None = None) -> PairingResult:
    """On-policy preference pairs: n samples per prompt from ``model``, paired by ``pairing`` (default: ``mode``)
    under a reward ``judge``, or labelled directly by a ``pairwise`` judge (``pairing.pair_judged``)."""
    samples = sample(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                     seed=seed, device=device, precision=precision, what="sampling for pairs")
    if pairwise is not None:
        return pair_judged(samples, prompts, pairwise, check_pairwise_mode(mode, n), max_invalid=max_invalid,
                           log_path=log_path)
    if judge is None:
        raise ValueError("make_pairs needs a reward judge or a pairwise judge")
    scores = judge.score([prompt_text(prompts[s.prompt_index]) for s in samples], [s.text for s in samples])
    pairing = pairing or make_pairing(mode, pairs_per_prompt=pairs_per_prompt)
    return pair_scored(samples, scores, prompts, pairing, seed=seed)
