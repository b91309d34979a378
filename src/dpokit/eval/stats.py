"""Statistics for evaluation: win rates with intervals, Best-of-N, the KL-regularized ceiling, summaries.

* Win rate: wins / (wins + losses) with a Wilson score interval; ties are reported separately
  (and as the common "ties count half" rate beside it).
* Best-of-N: the expected best-of-N reward estimated without bias from K >= N samples per prompt
  (order statistics: E[max of N] = sum_i r_(i) C(i-1, N-1) / C(K, N), r sorted ascending), and
  the KL of the Best-of-N policy from the reference, log N - (N-1)/N (Stiennon et al. 2020,
  Beirami et al. 2024): an upper bound, exact when rewards have no ties. With ties: the exact
  distribution of Best-of-N over the K empirical samples (``best_of_n_empirical``), and a
  population estimate that keeps tied values as atoms (``bon_kl_ties``).
* The ceiling: the KL-regularized optimum pi*_beta(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta) (the DPO
  paper's Eq. 4), estimated from K reference samples per prompt by exponential tilting; the best
  mean reward at each mean KL over the empirical reference (``ceiling_at_beta``, ``ceiling_at_kl``).
* Efficiency of a (KL, reward) point: its gain over the reference divided by the ceiling's gain at
  the same KL, with a bootstrap over prompts (``efficiency``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np


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


# --------------------------------------------------------------- Best-of-N over K empirical samples, with ties
def best_of_n_by(selection: Sequence[float], values: Sequence[float], n: int) -> float:
    """Unbiased E[value of the sample Best-of-n picks by ``selection``] from K >= n samples of one prompt.

    Best-of-n draws n of the K samples without replacement and returns the one with the highest selection score
    (a learned reward, an implicit reward), ties broken uniformly; it is judged by ``values`` (the true reward).
    With the distinct selection scores s_1 < ... < s_m held by c_j samples and C_j = c_1 + ... + c_j, the best
    score is s_j with probability (C(C_j, n) - C(C_{j-1}, n)) / C(K, n), and then each of its c_j samples is the
    one returned with equal probability: E = sum_j P_j mean(values of group j). With selection = values this is
    ``expected_best_of_n``.
    """
    k = len(selection)
    if len(values) != k:
        raise ValueError(f"{k} selection scores but {len(values)} values")
    if not 1 <= n <= k:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {k}")
    groups: dict[float, list[float]] = {}
    for s, v in zip(selection, values):
        groups.setdefault(float(s), []).append(float(v))
    total, below, out = math.comb(k, n), 0, 0.0
    for s in sorted(groups):
        vs = groups[s]
        mass = math.comb(below + len(vs), n) - math.comb(below, n)
        out += mass / total * (sum(vs) / len(vs))
        below += len(vs)
    return out


def ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    r = np.empty(a.size)
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and a[order[j + 1]] == a[order[i]]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (average ranks for ties)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom else float("nan")


def _tie_groups(rewards: Sequence[float]) -> tuple[list[float], list[int]]:
    """Distinct values in ascending order and how many samples hold each."""
    values: list[float] = []
    counts: list[int] = []
    for r in sorted(rewards):
        if values and r == values[-1]:
            counts[-1] += 1
        else:
            values.append(r)
            counts.append(1)
    return values, counts


def _bon_group_masses(counts: Sequence[int], n: int) -> list[Fraction]:
    """P(best value is the j-th smallest) = (C_j^n - C_{j-1}^n) / K^n, exactly; C_j = c_1 + ... + c_j."""
    k = sum(counts)
    out, below = [], 0
    for c in counts:
        out.append(Fraction((below + c) ** n - below**n, k**n))
        below += c
    return out


def _check_bon(rewards: Sequence[float], n: int) -> None:
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    if len(rewards) == 0:
        raise ValueError("best-of-n needs at least one reward")
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError("best-of-n needs finite rewards")


def best_of_n_probs(rewards: Sequence[float], n: int) -> list[float]:
    """Probability that Best-of-n over the K empirical samples of one prompt returns sample i, [K].

    Best-of-n draws n of the K samples uniformly with replacement and returns one with the highest
    reward, chosen uniformly among the drawn samples that tie for it. With the distinct values
    v_1 < ... < v_m held by c_j samples each and C_j = c_1 + ... + c_j, the best value is v_j with
    probability (C_j^n - C_{j-1}^n) / K^n, and by symmetry each of its c_j samples gets an equal share.
    """
    _check_bon(rewards, n)
    values, counts = _tie_groups(rewards)
    share = {v: m / c for v, c, m in zip(values, counts, _bon_group_masses(counts, n))}
    return [float(share[r]) for r in rewards]


def best_of_n_empirical(rewards: Sequence[float], n: int) -> tuple[float, float]:
    """(KL, expected reward) of Best-of-n over the K empirical samples of one prompt, exactly, ties included.

    KL(BoN || uniform over the K samples) = sum_j P_j log(K P_j / c_j) with P_j from ``best_of_n_probs``.
    Without ties it is below log n - (n-1)/n (the K samples coarsen the reward), and it tends to it as
    K grows; ties lower it further (n=2, all K rewards equal: 0). The reward is the plug-in
    sum_j P_j v_j (draws with replacement), not the unbiased ``expected_best_of_n``.
    """
    _check_bon(rewards, n)
    values, counts = _tie_groups(rewards)
    k = len(rewards)
    kl = reward = 0.0
    for v, c, m in zip(values, counts, _bon_group_masses(counts, n)):
        p = float(m)
        kl += p * math.log(float(m * k / c))
        reward += p * v
    return max(kl, 0.0), reward


def bon_kl_ties(rewards: Sequence[float], n: int) -> float:
    """Population KL(Best-of-n || reference) estimated from K samples of one prompt whose reward has atoms.

    Best-of-n's density ratio to the reference depends on the reward only, so its KL is the KL between
    reward laws: with CDF F, an atom v contributes P log(P / (F(v) - F(v-))), P = F(v)^n - F(v-)^n, and
    the continuous part int N u^(N-1) log(N u^(N-1)) du over its quantiles u. Here F is the empirical
    CDF; a value seen two or more times is an atom, a value seen once is continuous over its quantile
    interval [a, b] = [(C-1)/K, C/K], where the integral is
    log(n) (b^n - a^n) + (n-1) (b^n log b - a^n log a - (b^n - a^n)/n).
    Without ties this is exactly log n - (n-1)/n; consistent as K grows for atoms plus a density.
    """
    _check_bon(rewards, n)
    values, counts = _tie_groups(rewards)
    k = len(rewards)

    def xlogx_pow(u: float) -> float:  # u^n log u, 0 at u = 0
        return 0.0 if u == 0 else u**n * math.log(u)

    kl, below = 0.0, 0
    for c, m in zip(counts, _bon_group_masses(counts, n)):
        a, b = below / k, (below + c) / k
        if c >= 2:
            kl += float(m) * math.log(float(m * k / c))
        else:
            kl += math.log(n) * (b**n - a**n) + (n - 1) * (xlogx_pow(b) - xlogx_pow(a) - (b**n - a**n) / n)
        below += c
    return max(kl, 0.0)


# ------------------------------------------------------------------- the KL-regularized optimum ("ceiling")
RewardsByPrompt = Sequence[Sequence[float]] | np.ndarray


def reward_matrix(rewards_by_prompt: RewardsByPrompt) -> np.ndarray:
    """One sequence of K_p rewards per prompt -> [P, max K_p] float64, nan where a prompt has fewer samples."""
    if isinstance(rewards_by_prompt, np.ndarray):
        m = np.asarray(rewards_by_prompt, dtype=np.float64)
        if m.ndim != 2:
            raise ValueError(f"rewards must be [prompts, samples], got shape {m.shape}")
    else:
        rows = [list(map(float, r)) for r in rewards_by_prompt]
        width = max((len(r) for r in rows), default=0)
        m = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            m[i, : len(r)] = r
    if m.shape[0] == 0:
        raise ValueError("no prompts")
    for i in range(m.shape[0]):
        row = m[i][~np.isnan(m[i])]
        if row.size == 0:
            raise ValueError(f"prompt {i}: no rewards")
        if not np.all(np.isfinite(row)):
            raise ValueError(f"prompt {i}: rewards must be finite")
    return m


@dataclass(frozen=True)
class _Tilting:
    """Rewards [..., P, K] prepared once for many betas: d = r - (each prompt's max), -inf where absent."""

    d: np.ndarray
    r0: np.ndarray  # rewards, 0 where absent
    log_k: np.ndarray  # [..., P]

    @classmethod
    def of(cls, r: np.ndarray) -> _Tilting:
        mask = ~np.isnan(r)
        top = np.nanmax(r, axis=-1, keepdims=True)
        return cls(np.where(mask, r - top, -np.inf), np.where(mask, r, 0.0), np.log(mask.sum(-1)))


def _tilt(t: _Tilting, beta: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt (KL, reward) of w ∝ exp(r / beta) over each prompt's samples.

    beta: scalar or [...] in [0, inf]. With z = (r - max r) / beta (<= 0; clipped at -800, where exp
    is already 0), s = sum exp(z): log w = z - log s, so KL = sum w log(K w) = sum w z - log s + log K
    and reward = sum w r; nothing overflows. beta = inf gives the uniform weights (KL 0), beta = 0
    the uniform weights over each prompt's best samples. Returns two [..., P] arrays.
    """
    b = np.asarray(beta, dtype=np.float64)
    finite = (b > 0) & np.isfinite(b)
    with np.errstate(divide="ignore"):
        inv = np.where(finite, 1.0 / np.where(finite, b, 1.0), 1.0)[..., None, None]
    z = np.maximum(t.d * inv, -800.0)
    e = np.exp(z)
    s = e.sum(-1)
    kl = (e * z).sum(-1) / s - np.log(s) + t.log_k
    reward = (e * t.r0).sum(-1) / s
    if not finite.all():  # the limits, exactly
        top = t.d == 0
        m = top.sum(-1)
        bb = b[..., None]
        kl = np.where(bb == 0, t.log_k - np.log(m), np.where(np.isinf(bb), 0.0, kl))
        reward = np.where(bb == 0, (t.r0 * top).sum(-1) / m,
                          np.where(np.isinf(bb), t.r0.sum(-1) / np.exp(t.log_k), reward))
    return np.maximum(kl, 0.0), reward


@dataclass(frozen=True)
class CeilingPoint:
    """The tilted optimum at one beta: mean over prompts of its KL (nats per sequence) and reward."""

    beta: float
    kl: float
    reward: float


def ceiling_at_beta(rewards_by_prompt: RewardsByPrompt, beta: float) -> CeilingPoint:
    """pi*_beta ∝ pi_ref exp(r / beta) on the empirical reference (K samples per prompt, uniform weights).

    Within each prompt w_i = exp(r_i / beta) / sum_j exp(r_j / beta); KL = sum_i w_i log(K w_i), exact
    against the empirical reference; reward = sum_i w_i r_i; both averaged over prompts. beta = inf:
    (0, mean reward); beta = 0: (mean of log(K / #best), mean of the max).
    """
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    kl, reward = _tilt(_Tilting.of(reward_matrix(rewards_by_prompt)), beta)
    return CeilingPoint(float(beta), float(kl.mean()), float(reward.mean()))


def ceiling_curve(rewards_by_prompt: RewardsByPrompt, betas: Sequence[float]) -> list[CeilingPoint]:
    """The ceiling at each beta of a grid (KL falls and reward falls as beta grows)."""
    r = reward_matrix(rewards_by_prompt)
    return [ceiling_at_beta(r, b) for b in betas]


def ceiling_max_kl(rewards_by_prompt: RewardsByPrompt) -> float:
    """The largest KL the ceiling reaches on these samples (beta -> 0): mean of log(K / #best)."""
    return ceiling_at_beta(rewards_by_prompt, 0.0).kl


def _beta_at_kl(t: _Tilting, target: np.ndarray, iters: int = 56) -> np.ndarray:
    """Bisection on log beta for the beta whose mean KL is target, vectorized over replicates.

    t: rewards [B, P, K]; target: [B]. Mean KL falls monotonically in beta (dKL/dbeta =
    -Var_w(r) / beta^3 per prompt). Returns beta [B], taken on the side where KL <= target (so the
    reward is not overstated); inf where target <= 0, 0 where target >= the largest KL.
    """
    gaps = -t.d[np.isfinite(t.d) & (t.d < 0)]
    if gaps.size == 0:  # no prompt has two distinct rewards: KL is 0 at every beta
        return np.full(target.shape, np.inf)
    # at beta = min gap / 800 every weight but the best's underflows to 0: KL is at its largest;
    # at beta = max gap * e^60, KL ~ Var / (2 beta^2) ~ e^-120. 56 halvings of that bracket leave < 1e-14.
    lo = np.full(target.shape, math.log(gaps.min() / 800))
    hi = np.full(target.shape, math.log(gaps.max()) + 60.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = _tilt(t, np.exp(mid))[0].mean(-1) > target
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    kl_max = _tilt(t, 0.0)[0].mean(-1)
    return np.where(target <= 0, np.inf, np.where(target >= kl_max, 0.0, np.exp(hi)))


def ceiling_at_kl(rewards_by_prompt: RewardsByPrompt, kl: float) -> CeilingPoint:
    """The ceiling at a mean KL (bisection on beta): the best mean reward any policy on the empirical
    reference reaches with mean KL <= kl (the tilted family solves max E[r] - beta KL). Beyond
    ``ceiling_max_kl`` it stays at the max (its .kl then tells it is smaller than asked)."""
    if not kl >= 0:
        raise ValueError(f"KL must be >= 0, got {kl}")
    r = reward_matrix(rewards_by_prompt)
    beta = float(_beta_at_kl(_Tilting.of(r[None]), np.array([kl]))[0])
    return ceiling_at_beta(r, beta)


def ceiling_by_k(rewards_by_prompt: RewardsByPrompt, k: int, kls: Sequence[float]) -> np.ndarray:
    """How the ceiling estimate depends on K: [replicates, len(kls)] ceiling rewards from k samples per prompt.

    Each prompt's K samples (iid, all prompts the same K) are cut into K // k consecutive groups of k;
    replicate j keeps group j of every prompt. Compare the replicates' mean with the ceiling from all K.
    """
    r = reward_matrix(rewards_by_prompt)
    if np.isnan(r).any():
        raise ValueError("ceiling_by_k needs the same number of samples for every prompt")
    if not 1 <= k <= r.shape[1]:
        raise ValueError(f"k must be in [1, {r.shape[1]}], got {k}")
    reps = r.shape[1] // k
    return np.array([[ceiling_at_kl(r[:, j * k : (j + 1) * k], x).reward for x in kls] for j in range(reps)])


# ---------------------------------------------------------------------------------------------- efficiency
@dataclass(frozen=True)
class Efficiency:
    """(reward - reference reward) / (ceiling(KL) - reference reward), with a bootstrap over prompts."""

    efficiency: float
    stderr: float  # standard deviation of the bootstrap replicates
    low: float  # 2.5% and 97.5% bootstrap percentiles
    high: float
    kl: float
    reward: float
    reference_reward: float
    ceiling_reward: float
    beta: float  # the ceiling's beta at this KL
    beyond_support: bool  # KL above what the ceiling reaches on these samples (ceiling held at its max)
    n_boot: int
    n_boot_undefined: int  # resamples whose ceiling gain is 0 (every resampled prompt flat): left out, counted

    def to_dict(self) -> dict[str, float | bool | int]:
        return asdict(self)


def _efficiency_of(reward: np.ndarray, kl: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """reward, kl: [B, P]; r: [B, P, K] -> (efficiency [B], beta [B])."""
    t = _Tilting.of(r)
    beta = _beta_at_kl(t, kl.mean(-1))
    base = _tilt(t, np.inf)[1].mean(-1)
    ceil = _tilt(t, beta)[1].mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (reward.mean(-1) - base) / (ceil - base), beta


def efficiency(rewards: Sequence[float], kls: Sequence[float], ref_rewards_by_prompt: RewardsByPrompt, *,
               n_boot: int = 2000, seed: int = 0) -> Efficiency:
    """Efficiency of a policy (or any method) measured on P prompts.

    rewards[p], kls[p]: the method's mean reward and KL(method || reference) on prompt p (means over its
    samples there); ref_rewards_by_prompt[p]: K reference rewards on the same prompt p, from which the
    reference reward and the ceiling (``ceiling_at_kl`` at the mean KL) are estimated.

    The standard error is a bootstrap over prompts (``n_boot`` resamples of P prompts with replacement,
    each recomputing the method's reward and KL, the reference reward and the ceiling from the same
    resampled prompts). Why not the delta method: the ceiling is an implicit function of the data
    (beta solved so that the mean KL matches), the prompt effect is shared by numerator and denominator
    (an easy prompt is easy for the method and the ceiling alike, and resampling prompts jointly keeps
    that correlation), and the ratio is far from linear when the ceiling's gain is small.
    """
    rew, kl_ = np.asarray(rewards, dtype=np.float64), np.asarray(kls, dtype=np.float64)
    r = reward_matrix(ref_rewards_by_prompt)
    if not (rew.shape == kl_.shape == (r.shape[0],)):
        raise ValueError(f"need one reward and one KL per prompt: {rew.size} rewards, {kl_.size} KLs, "
                         f"{r.shape[0]} prompts of reference rewards")
    eff, beta = _efficiency_of(rew[None], kl_[None], r[None])
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, n_boot, 250):  # chunks keep the [B, P, K] arrays small
        idx = rng.integers(0, r.shape[0], size=(min(250, n_boot - start), r.shape[0]))
        reps.append(_efficiency_of(rew[idx], kl_[idx], r[idx])[0])
    boot = np.concatenate(reps) if reps else np.zeros(0)
    undefined = int((~np.isfinite(boot)).sum())
    boot = boot[np.isfinite(boot)]
    point = ceiling_at_beta(r, float(beta[0]))
    k_mean = float(kl_.mean())
    return Efficiency(
        efficiency=float(eff[0]), stderr=float(boot.std(ddof=1)) if boot.size > 1 else float("nan"),
        low=float(np.percentile(boot, 2.5)) if boot.size else float("nan"),
        high=float(np.percentile(boot, 97.5)) if boot.size else float("nan"),
        kl=k_mean, reward=float(rew.mean()), reference_reward=ceiling_at_beta(r, math.inf).reward,
        ceiling_reward=point.reward, beta=point.beta, beyond_support=k_mean > ceiling_max_kl(r), n_boot=n_boot,
        n_boot_undefined=undefined)
