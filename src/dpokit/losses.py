"""Preference losses: small pure functions in a registry.

Contract (DESIGN.md): ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
ref_rejected_logps, *, beta, **options) -> (losses, chosen_rewards, rejected_rewards)``, every
tensor of shape [B]. Rewards are the implicit rewards ``beta * (log pi - log pi_ref)``,
detached: they are for metrics, the loss carries the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """What a loss is and what it needs from the training loop."""

    fn: Callable[..., LossOutput]
    paper: str
    needs_reference: bool = True
    length_normalized: bool = False  # wants mean (per-token) rather than summed log-probs
    options: dict[str, float] = field(default_factory=dict)  # option name -> default


LOSSES: dict[str, LossSpec] = {}


def register(name: str, paper: str, **kw) -> Callable[[Callable[..., LossOutput]], Callable[..., LossOutput]]:
    def deco(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        LOSSES[name] = LossSpec(fn=fn, paper=paper, **kw)
        return fn

    return deco


def implicit_rewards(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) for chosen and rejected, [B] each (detached)."""
    return (
        (beta * (policy_chosen_logps - ref_chosen_logps)).detach(),
        (beta * (policy_rejected_logps - ref_rejected_logps)).detach(),
    )


@register(
    "sigmoid",
    "Rafailov et al. 2023, Direct Preference Optimization, Eq. 7; label smoothing: Mitchell 2023, cDPO",
    options={"label_smoothing": 0.0},
)
def sigmoid_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    *, beta: float, label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO: L = -log sigma(beta * h), h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)].

    With label smoothing eps (the probability that the label is flipped, cDPO):
    L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h). eps = 0 is plain DPO.
    Inputs: summed sequence log-probs [B]; outputs [B].
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * h)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    return (losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps,
                                      ref_chosen_logps, ref_rejected_logps, beta))


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        import difflib

        close = difflib.get_close_matches(name, list(LOSSES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown loss '{name}' (known: {', '.join(sorted(LOSSES))}){hint}")
    return LOSSES[name]


LN2 = math.log(2.0)
