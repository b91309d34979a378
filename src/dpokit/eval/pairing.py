"""Pairing: which (chosen, rejected) pairs the scored samples of one prompt make.

A pairing mode is an object with one method, ``pairs(rewards, rng) -> [(winner, loser), ...]``: positions in
the prompt's list of n samples (in the order they were drawn). Modes:

* ``BestWorst(k)``: the j-th best against the j-th worst, j < k (the DPO paper's sentiment setup); ties in
  reward keep the order the samples were drawn in;
* ``AllPairs()``: every pair with different rewards, n(n-1)/2 at most;
* ``RandomPairs()``: the samples paired as drawn, (1st, 2nd), (3rd, 4th), ...; the samples are i.i.d., so these
  are random pairs; each labelled by the reward (an equal reward makes no pair);
* ``RSO(beta, m)``: statistical rejection sampling (Liu et al. 2023, "Statistical Rejection Sampling Improves
  Preference Optimization", Sec. 3.2 and Alg. 1) draws m of the n candidates, without replacement, from the
  optimal policy pi_r(y) ∝ pi_ref(y) exp(r(y) / beta) estimated on them: a candidate not yet accepted is
  proposed uniformly (the empirical pi_ref) and accepted with probability exp((r - r_max) / beta), r_max the
  largest reward among the candidates not yet accepted (Eq. 14); each acceptance is thus a draw from the tilted
  distribution over the remaining candidates (Eq. 17). The accepted samples are then paired in the order they
  were accepted and each pair labelled by the reward (the paper's "first-round-rank");
* ``BradleyTerry(tau)``: random pairs as ``RandomPairs``, the winner drawn with P(a beats b) =
  sigma((r_a - r_b) / tau): labels from a Bradley-Terry model with reward r / tau. DPO at beta on such labels
  targets pi*_{tau beta} ∝ pi_ref exp(r / (tau beta)) (the BT reward is r / tau).

Every random draw comes from ``rng``, a ``random.Random`` seeded per (seed, prompt) by ``prompt_rng``, so the
pairs of a prompt do not depend on the other prompts or on the order they are processed in.

``pair_scored`` applies a mode to samples scored by a reward judge; ``pair_judged`` makes pairs with a pairwise
judge (an OpenAI-compatible endpoint), which labels each candidate pair directly (both orders; the orders
disagreeing is a tie): with n = 2 the one pair, with n > 2 the random pairs (``random``) or every pair
(``all-pairs``). Modes that rank by a reward per sample (``best-worst`` with n > 2, ``rso``, ``bt``) need a
reward judge. A pair of identical or empty texts is never made; every candidate pair left out is counted by
reason, and every prompt that makes no pair is counted.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dpokit.data.formats import Text

Pair = tuple[int, int]  # (winner, loser): positions among one prompt's samples
MODES = ("best-worst", "all-pairs", "random", "rso", "bt")


class Pairing(Protocol):
    name: str

    def pairs(self, rewards: Sequence[float], rng: random.Random) -> list[Pair]: ...


def _by_reward(a: int, b: int, rewards: Sequence[float]) -> Pair | None:
    """(winner, loser) of samples a and b by reward; None when they tie."""
    if rewards[a] == rewards[b]:
        return None
    return (a, b) if rewards[a] > rewards[b] else (b, a)


@dataclass(frozen=True)
class BestWorst:
    """The j-th best against the j-th worst, j < ``per_prompt``; a pair whose rewards tie is left out."""

    per_prompt: int = 1
    name: str = "best-worst"

    def pairs(self, rewards: Sequence[float], rng: random.Random) -> list[Pair]:
        ranked = sorted(range(len(rewards)), key=lambda i: -rewards[i])  # stable: ties in drawing order
        out = []
        for j in range(min(self.per_prompt, len(ranked) // 2)):
            hi, lo = ranked[j], ranked[-1 - j]
            if rewards[hi] > rewards[lo]:
                out.append((hi, lo))
        return out


@dataclass(frozen=True)
class AllPairs:
    """Every pair of samples with different rewards, best first (as ranked), then by drawing order."""

    name: str = "all-pairs"

    def pairs(self, rewards: Sequence[float], rng: random.Random) -> list[Pair]:
        ranked = sorted(range(len(rewards)), key=lambda i: -rewards[i])
        return [(ranked[a], ranked[b]) for a in range(len(ranked)) for b in range(a + 1, len(ranked))
                if rewards[ranked[a]] > rewards[ranked[b]]]


def in_order(n: int) -> list[Pair]:
    """Samples paired as drawn: (0, 1), (2, 3), ...; an odd last sample is left alone."""
    return [(i, i + 1) for i in range(0, n - 1, 2)]


@dataclass(frozen=True)
class RandomPairs:
    """(1st, 2nd), (3rd, 4th), ... of the i.i.d. samples, each labelled by its rewards (a tie makes no pair)."""

    name: str = "random"

    def pairs(self, rewards: Sequence[float], rng: random.Random) -> list[Pair]:
        return [p for a, b in in_order(len(rewards)) if (p := _by_reward(a, b, rewards)) is not None]


def rejection_sample(rewards: Sequence[float], m: int, beta: float, rng: random.Random,
                     trials: list[tuple[int, bool]] | None = None) -> list[int]:
    """m distinct positions drawn by statistical rejection sampling (RSO, Sec. 3.2), in the order accepted.

    Until m are accepted: propose a candidate not yet accepted uniformly at random, draw u ~ U[0, 1), and accept
    it when u < exp((r - r_max) / beta), r_max the largest reward among the candidates not yet accepted. Given
    the accepted set, the next acceptance is candidate i with probability exp(r_i / beta) / sum_j exp(r_j / beta)
    over the remaining j (Eq. 15-17 with the empirical pi_ref). ``trials`` (for tests) receives every
    (proposed position, accepted).
    """
    if not beta > 0:
        raise ValueError(f"the rejection-sampling beta must be > 0, got {beta}")
    if not 1 <= m <= len(rewards):
        raise ValueError(f"cannot accept {m} of {len(rewards)} candidates")
    left = list(range(len(rewards)))
    accepted: list[int] = []
    while len(accepted) < m:
        r_max = max(rewards[i] for i in left)
        pick = left[rng.randrange(len(left))]
        ok = rng.random() < math.exp((rewards[pick] - r_max) / beta)
        if trials is not None:
            trials.append((pick, ok))
        if ok:
            accepted.append(pick)
            left.remove(pick)
    return accepted


@dataclass(frozen=True)
class RSO:
    """``m`` samples by statistical rejection sampling at ``beta`` (Liu et al. 2023), paired as accepted
    (1st with 2nd, 3rd with 4th, ...), each pair labelled by the reward."""

    beta: float = 0.5
    m: int = 2
    name: str = "rso"

    def __post_init__(self) -> None:
        if not self.beta > 0 or self.m < 2:
            raise ValueError(f"rso needs beta > 0 and m >= 2 accepted samples, got beta={self.beta}, m={self.m}")

    def pairs(self, rewards: Sequence[float], rng: random.Random) -> list[Pair]:
        chosen = rejection_sample(rewards, min(self.m, len(rewards)), self.beta, rng)
        return [p for a, b in in_order(len(chosen)) if (p := _by_reward(chosen[a], chosen[b], rewards)) is not None]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@dataclass(frozen=True)
class BradleyTerry:
    """Random pairs (as drawn); a beats b with probability sigma((r_a - r_b) / tau). Equal rewards: a coin flip
    (the model's own label; such a pair is kept)."""

    tau: float = 1.0
    name: str = "bt"

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"bt needs a temperature tau > 0, got {self.tau}")

    def pairs(self, rewards: Sequence[float], rng: random.Random) -> list[Pair]:
        out = []
        for a, b in in_order(len(rewards)):
            out.append((a, b) if rng.random() < sigmoid((rewards[a] - rewards[b]) / self.tau) else (b, a))
        return out


def make_pairing(mode: str, *, pairs_per_prompt: int = 1, rso_beta: float = 0.5, rso_samples: int = 2,
                 bt_tau: float = 1.0) -> Pairing:
    """The pairing object of a mode name (one of ``MODES``) and its options."""
    if mode == "best-worst":
        return BestWorst(pairs_per_prompt)
    if mode == "all-pairs":
        return AllPairs()
    if mode == "random":
        return RandomPairs()
    if mode == "rso":
        return RSO(rso_beta, rso_samples)
    if mode == "bt":
        return BradleyTerry(bt_tau)
    raise ValueError(f"unknown pairing mode {mode!r}; one of {', '.join(MODES)}")


def describe(pairing: Pairing) -> dict[str, Any]:
    """The mode and its options, for run records."""
    return dataclasses.asdict(pairing) if dataclasses.is_dataclass(pairing) else {"name": pairing.name}


def prompt_rng(seed: int, prompt_index: int, salt: str = "") -> random.Random:
    """The random stream of one prompt's pairing: the same for the same (seed, prompt, salt) on every machine."""
    return random.Random(f"dpokit-pairs-{seed}-{salt}-{prompt_index}")


def prompt_text(prompt: Text) -> str:
    """What a judge sees of a prompt: the text, or the last message of a conversation."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


@dataclass
class PairingResult:
    """Preference records, prompts that made no pair, and candidate pairs left out by reason."""

    records: list[dict[str, Any]]
    prompts_without_pair: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    comparisons: int = 0  # pairwise judgements asked for (pair_judged)

    def summary(self) -> str:
        why = ", ".join(f"{n} {k}" for k, n in sorted(self.dropped.items()))
        return (f"{len(self.records)} pairs; {self.prompts_without_pair} prompts made no pair"
                + (f"; candidate pairs left out: {why}" if why else ""))


def _usable(chosen: str, rejected: str) -> str | None:
    """Why two texts cannot be a pair, or None."""
    if not chosen.strip() or not rejected.strip():
        return "empty text"
    if chosen == rejected:
        return "identical texts"
    return None


def _group(samples: Sequence[Any]) -> dict[int, list[int]]:
    """prompt index -> positions of its samples in ``samples`` (drawing order)."""
    out: dict[int, list[int]] = {}
    for pos, s in enumerate(samples):
        out.setdefault(s.prompt_index, []).append(pos)
    return out


def pair_scored(samples: Sequence[Any], scores: Sequence[float], prompts: Sequence[Text], pairing: Pairing,
                seed: int = 0, salt: str = "") -> PairingResult:
    """Pairs from samples (``.prompt_index``, ``.text``) scored by a reward judge; records carry
    ``prompt``, ``chosen``, ``rejected``, ``chosen_score``, ``rejected_score`` (prompt-major order)."""
    result = PairingResult([])
    for i, positions in sorted(_group(samples).items()):
        rewards = [float(scores[p]) for p in positions]
        made = 0
        for w, lo in pairing.pairs(rewards, prompt_rng(seed, i, salt)):
            chosen, rejected = samples[positions[w]].text, samples[positions[lo]].text
            why = _usable(chosen, rejected)
            if why is not None:
                result.dropped[why] += 1
                continue
            result.records.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected,
                                   "chosen_score": rewards[w], "rejected_score": rewards[lo]})
            made += 1
        result.prompts_without_pair += made == 0
    return result


PAIRWISE_MODES = ("random", "all-pairs")


def check_pairwise_mode(mode: str, n: int) -> str:
    """The candidate pairs a pairwise judge labels: with n = 2 the one pair (whatever the mode); with n > 2
    'random' or 'all-pairs'. Raises ValueError for a mode that needs a reward per sample."""
    if n == 2 and mode in ("best-worst", "random", "all-pairs"):
        return "random"
    if mode in PAIRWISE_MODES:
        return mode
    raise ValueError(f"--mode {mode} ranks samples by a reward per sample; a pairwise judge (--judge-openai) "
                     f"compares two samples at a time: use -n 2, or --mode random (n/2 pairs per prompt) or "
                     f"--mode all-pairs (n(n-1)/2), each pair labelled directly")


def pair_judged(samples: Sequence[Any], prompts: Sequence[Text], pairwise: Any, mode: str = "random", *,
                max_invalid: float = 0.1, log_path: Path | None = None) -> PairingResult:
    """Pairs labelled directly by a pairwise judge (``compare(prompt, a, b) -> 1 | 0 | 0.5 | None``).

    Candidate pairs per prompt: ``random``: (1st, 2nd), (3rd, 4th), ...; ``all-pairs``: every pair. A pair of
    identical or empty texts is not sent to the judge. Outcome 1: a wins; 0: b wins; 0.5 (the two orders
    disagree): a tie, no pair; None: the judge failed, no pair; more than ``max_invalid`` failures stop with
    ``JudgeError`` (``evaluate.judge_pairs``). Records carry ``judgement``: the outcome for the chosen text (1).
    """
    from dpokit.eval.evaluate import judge_pairs

    if mode not in PAIRWISE_MODES:
        raise ValueError(f"a pairwise judge pairs samples 'random' or 'all-pairs', not {mode!r}")
    result = PairingResult([])
    candidates: list[tuple[int, int, int]] = []  # (prompt index, position a, position b) in ``samples``
    made: Counter[int] = Counter()
    groups = _group(samples)
    for i, positions in sorted(groups.items()):
        local = in_order(len(positions)) if mode == "random" else \
            [(a, b) for a in range(len(positions)) for b in range(a + 1, len(positions))]
        for a, b in local:
            why = _usable(samples[positions[a]].text, samples[positions[b]].text)
            if why is not None:
                result.dropped[why] += 1
            else:
                candidates.append((i, positions[a], positions[b]))
    items = [(prompt_text(prompts[i]), samples[a].text, samples[b].text) for i, a, b in candidates]
    outcomes = judge_pairs(pairwise, items, max_invalid=max_invalid, log_path=log_path) if items else []
    result.comparisons = len(items)
    for (i, a, b), outcome in zip(candidates, outcomes):
        if outcome is None:
            result.dropped["judge failed"] += 1
        elif outcome == 0.5:
            result.dropped["tie (the two orders disagree)"] += 1
        else:
            w, lo = (a, b) if outcome == 1 else (b, a)
            result.records.append({"prompt": prompts[i], "chosen": samples[w].text, "rejected": samples[lo].text,
                                   "judgement": 1.0})
            made[i] += 1
    result.prompts_without_pair = sum(1 for i in groups if not made[i])
    return result
