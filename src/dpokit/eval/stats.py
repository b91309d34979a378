"""Statistics for evaluation: win rates with intervals, Best-of-N, summaries.

* Win rate: wins / (wins + losses) with a Wilson score interval; ties are reported separately
  (and as the common "ties count half" rate beside it).
* Best-of-N: the expected best-of-N reward estimated without bias from K >= N samples per prompt
  (order statistics: E[max of N] = sum_i r_(i) C(i-1, N-1) / C(K, N), r sorted ascending), and
  the KL of the Best-of-N policy from the reference, log N - (N-1)/N (Stiennon et al. 2020,
  Beirami et al. 2024): an upper bound, exact when rewards have no ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WinRate:
    wins: int
    losses: int
    ties: int
    invalid: int  # judgements that could not be obtained (counted, never folded into ties)
    rate: float  # wins / (wins + losses)
    low: float
    high: float
    rate_ties_half: float  # (wins + ties / 2) / (wins + losses + ties)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(outcomes: Sequence[float | None]) -> WinRate:
    """Outcomes per comparison: 1 = policy wins, 0 = reference wins, 0.5 = tie, None = no judgement."""
    wins = sum(1 for o in outcomes if o == 1)
    losses = sum(1 for o in outcomes if o == 0)
    ties = sum(1 for o in outcomes if o == 0.5)
    invalid = sum(1 for o in outcomes if o is None)
    decided = wins + losses
    low, high = wilson_interval(wins, decided)
    judged = decided + ties
    return WinRate(wins, losses, ties, invalid, wins / decided if decided else float("nan"), low, high,
                   (wins + ties / 2) / judged if judged else float("nan"))


def bon_kl_bound(n: int) -> float:
    """KL(Best-of-N || reference) = log N - (N - 1) / N, exact for a reward without ties."""
    return math.log(n) - (n - 1) / n


def expected_best_of_n(rewards: Sequence[float], n: int) -> float:
    """Unbiased E[max reward of n draws without replacement] from K >= n samples of one prompt."""
    k = len(rewards)
    if not 1 <= n <= k:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {k}")
    r = sorted(rewards)
    total = math.comb(k, n)
    return sum(r[i] * math.comb(i, n - 1) for i in range(n - 1, k)) / total


def mean_stderr(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n == 1:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def curve_at(points: Sequence[tuple[float, float]], x: float) -> float:
    """A piecewise-linear curve through (x, y) points, evaluated at x; nan outside its range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return float("nan")


def frontier_dominance(method_points: Sequence[tuple[str, float, float]],
                       baseline: Sequence[tuple[float, float]]) -> dict:
    """Does each (label, kl, reward) point lie above the baseline's reward-vs-KL curve at its KL?

    A point beyond the baseline's KL range has nothing to be compared with and is counted apart.
    """
    rows = []
    for label, kl, reward in method_points:
        ref = curve_at(baseline, kl)
        rows.append({"label": label, "kl": kl, "reward": reward, "baseline_reward_at_kl": ref,
                     "dominates": None if ref != ref else reward > ref})
    known = [r for r in rows if r["dominates"] is not None]
    wins = sum(r["dominates"] for r in known)
    beyond = len(rows) - len(known)
    summary = (f"{wins} of {len(known)} points lie above the baseline curve at equal KL"
               + (f"; {beyond} lie beyond its largest KL (nothing to compare with)" if beyond else ""))
    return {"rows": rows, "wins": wins, "compared": len(known), "beyond": beyond, "summary": summary}
