"""Recipes: what one micro-batch of a stage computes. The loop (``dpokit.train.loop``) owns every state.

A recipe turns tokenized examples into a typed micro-batch (``collate``), says how many normalization
units they hold (``units``: pairs, examples, groups, or SFT completion tokens), and computes the
micro-batch's summed loss divided by the units of the whole optimizer step, with its metrics as
(sum, count) tensors (``compute``). ``policy`` is the (possibly wrapped) ``LogProbs`` module: every
forward goes through it. ``reference`` is a ``dpokit.reference.Reference``.

Four recipes share this shape:

* ``PairedRecipe`` (DPO and its family, mixtures, RPO's NLL term): rows [chosen..., rejected...] in one
  forward; the reference through ``Reference.logps``;
* ``UnpairedRecipe`` (KTO): matched rows plus mismatched (prompt_i, completion_{i-1}) rows for the KL baseline;
* ``RankedRecipe`` (Plackett-Luce): the K responses of a prompt in one forward;
* ``SFTRecipe``: next-token loss on completion tokens, L = -(1 / sum_i |y_i|) sum_i log pi(y_i | x_i).

Metric keys are fixed per recipe (``keys``), so every micro-batch reports the same keys; a count of 0
means "no value" (a KTO micro-batch with no desirable example).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpokit.data.collate import LayoutBatch, Sequences, layout, pair_sequences
from dpokit.data.tokenize import TokenizedPair, TokenizedRanked, TokenizedSFT, TokenizedUnpaired
from dpokit.losses import ResolvedLoss, kto_loss, paired_losses, plackett_luce_loss

Logs = dict[str, tuple[torch.Tensor, Any]]  # metric name -> (sum, count); tensors until a line is logged
Policy = Callable[[LayoutBatch], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Batch:
    """A micro-batch: the layout the model computes, the dataset positions of its examples, and for each sequence
    row the (example position, slot) it comes from — ``None`` when a row mixes examples (KTO's KL rows)."""

    seqs: LayoutBatch
    index: list[int]
    rows: list[tuple[int, int]] | None

    @property
    def tokens(self) -> int:
        """Real (non-pad) token positions the policy computes: for throughput."""
        return self.seqs.tokens

    def to(self, device: torch.device) -> Any:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved["seqs"] = self.seqs.to(device)
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return type(self)(**moved)


@dataclass
class UnpairedBatch(Batch):
    labels: torch.Tensor = None  # type: ignore[assignment]  # [B] bool: desirable


@dataclass
class RankedBatch(Batch):
    group_sizes: list[int] = None  # type: ignore[assignment]


def _sum(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().sum()


def token_metrics(stats: torch.Tensor, lengths: torch.Tensor, chosen: slice | None = None) -> Logs:
    """TRL's token-level metrics from ``LogProbs(..., stats=True)``'s per-sequence sums ``stats`` [N, 3] (entropy,
    mean logit, argmax hits) and completion ``lengths`` [N], pooled over tokens as (sum, count).

    ``entropy``: mean next-token entropy over every completion token; with ``chosen`` (the chosen rows of a paired
    batch) also ``logits/chosen``, ``logits/rejected`` (mean over the vocabulary of the logits, averaged over the
    completion tokens of the chosen / rejected rows) and ``mean_token_accuracy`` (share of chosen completion tokens
    that are the argmax); without it (SFT) ``mean_token_accuracy`` is over every row.
    """
    st = stats.detach().float()
    logs: Logs = {"entropy": (st[:, 0].sum(), lengths.sum())}
    if chosen is None:
        logs["mean_token_accuracy"] = (st[:, 2].sum(), lengths.sum())
        return logs
    rejected = slice(chosen.stop, None)
    logs["logits/chosen"] = (st[chosen, 1].sum(), lengths[chosen].sum())
    logs["logits/rejected"] = (st[rejected, 1].sum(), lengths[rejected].sum())
    logs["mean_token_accuracy"] = (st[chosen, 2].sum(), lengths[chosen].sum())
    return logs


def pair_metrics(
    losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
) -> Logs:
    """Per-pair metrics as (sum, count) under the field's usual names; every input [B]."""
    n = losses.shape[0]
    return {
        "loss": (_sum(losses), n),
        "rewards/chosen": (_sum(chosen_rewards), n),
        "rewards/rejected": (_sum(rejected_rewards), n),
        "rewards/accuracies": (_sum((chosen_rewards > rejected_rewards).float()), n),
        "rewards/margins": (_sum(chosen_rewards - rejected_rewards), n),
        "logps/chosen": (_sum(policy_chosen), n),
        "logps/rejected": (_sum(policy_rejected), n),
    }


class Recipe:
    """Base: ``collate`` lays out ``sequences(items)`` with the configured layout."""

    name = "recipe"
    throughput_name = "pairs_per_s"
    postfix: tuple[str, ...] = ("loss",)
    keys: tuple[str, ...] = ("loss",)
    batch_type: type[Batch] = Batch
    splittable = True  # the loss sums over examples, so a micro-batch may run as several forwards (StepOrder)

    def __init__(self, pad_id: int, layout: str = "auto"):
        self.pad_id, self.layout = pad_id, layout
        self.layouts_used: Counter[str] = Counter()  # layout name -> micro-batches collated with it

    def sequences(self, items: Sequence[Any], index: Sequence[int]) -> tuple[Sequences, list[tuple[int, int]] | None]:
        raise NotImplementedError

    def extras(self, items: Sequence[Any]) -> dict[str, Any]:
        return {}

    @staticmethod
    def cost(item: Any) -> int:
        """The positions ``item`` adds to a forward: its distinct tokens (the prompt once, then each completion)."""
        completions = item.completion_ids if hasattr(item, "completion_ids") else [item.chosen_ids, item.rejected_ids]
        if completions and isinstance(completions[0], int):  # one completion (SFT)
            completions = [completions]
        return len(item.prompt_ids) + sum(len(c) for c in completions)

    def collate(self, items: Sequence[Any], index: Sequence[int]) -> Batch:
        seqs, rows = self.sequences(items, index)
        laid = layout(seqs, self.layout, self.pad_id)
        self.layouts_used[laid.name] += 1
        return self.batch_type(laid, list(index), rows, **self.extras(items))

    def units(self, items: Sequence[Any]) -> int:
        return len(items)

    def compute(self, policy: Policy, batch: Any, denom: int) -> tuple[torch.Tensor, Logs]:
        raise NotImplementedError


class PairedRecipe(Recipe):
    name = "dpo"
    postfix = ("loss", "rewards/margins", "rewards/accuracies")
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logratio/chosen", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")

    def __init__(self, loss: ResolvedLoss, reference: Any, pad_id: int, layout: str = "auto"):
        super().__init__(pad_id, layout)
        self.loss, self.reference = loss, reference

    def sequences(self, items: Sequence[TokenizedPair], index: Sequence[int]
                  ) -> tuple[Sequences, list[tuple[int, int]]]:
        return pair_sequences(items, index)

    def compute(self, policy: Policy, batch: Batch, denom: int) -> tuple[torch.Tensor, Logs]:
        ref = self.reference.logps(batch)  # first: no forward without gradients between forward and backward
        sums, lengths, stats = policy(batch.seqs, stats=True)
        losses, cr, rj = paired_losses(self.loss, sums, ref, lengths)
        pc, pr = sums.chunk(2)
        logs = pair_metrics(losses, cr, rj, pc, pr)
        logs["logratio/chosen"] = (_sum(pc - ref.chunk(2)[0]), losses.shape[0])
        logs.update(token_metrics(stats, lengths, slice(0, losses.shape[0])))
        return losses.sum() / denom, logs


class UnpairedRecipe(Recipe):
    """KTO; its KL baseline is estimated per micro-batch (so it needs micro-batches of >= 2 examples)."""

    name = "kto"
    throughput_name = "examples_per_s"
    postfix = ("loss", "kl")
    keys = ("loss", "kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected")
    batch_type = UnpairedBatch
    splittable = False

    def __init__(self, loss: ResolvedLoss, reference: Any, pad_id: int, layout: str = "auto"):
        super().__init__(pad_id, layout)
        self.loss, self.reference = loss, reference

    def sequences(self, items: Sequence[TokenizedUnpaired], index: Sequence[int]) -> tuple[Sequences, None]:
        """Rows 0..B-1: (prompt_i, completion_i); rows B..2B-1: (prompt_i, completion_{(i-1) mod B}) for the KL
        term (the same mismatched pairs as TRL's KTOTrainer). Row i and row B+i share prompt i."""
        b = len(items)
        rows = [(x.prompt_ids, x.completion_ids) for x in items]
        rows += [(items[i].prompt_ids, items[(i - 1) % b].completion_ids) for i in range(b)]
        return Sequences(rows, [[i, b + i] for i in range(b)]), None

    def extras(self, items: Sequence[TokenizedUnpaired]) -> dict[str, Any]:
        return {"labels": torch.tensor([x.label for x in items], dtype=torch.bool)}

    def compute(self, policy: Policy, batch: UnpairedBatch, denom: int) -> tuple[torch.Tensor, Logs]:
        ref_sums = self.reference.logps(batch)
        sums, _ = policy(batch.seqs)
        pol, pol_kl = sums.chunk(2)
        ref, ref_kl = ref_sums.chunk(2)
        kl = (pol_kl - ref_kl).detach().mean()
        labels = batch.labels
        losses, rewards, _ = kto_loss(pol, ref, labels, kl, beta=self.loss.beta, **self.loss.terms[0].options)
        good, bad = labels, ~labels
        r, p = rewards.float(), pol.detach()
        logs: Logs = {
            "loss": (_sum(losses), len(losses)), "kl": (kl.float(), 1),
            "rewards/chosen": (_sum(r[good]), good.sum()), "logps/chosen": (_sum(p[good]), good.sum()),
            "rewards/rejected": (_sum(r[bad]), bad.sum()), "logps/rejected": (_sum(p[bad]), bad.sum()),
        }
        return losses.sum() / denom, logs


class RankedRecipe(Recipe):
    """Plackett-Luce over the K responses of each prompt (best first), one forward for all of them."""

    name = "dpo-pl"
    throughput_name = "groups_per_s"
    postfix = ("loss", "rewards/margins")
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
    batch_type = RankedBatch

    def __init__(self, loss: ResolvedLoss, reference: Any, pad_id: int, layout: str = "auto"):
        super().__init__(pad_id, layout)
        self.loss, self.reference = loss, reference

    def sequences(self, items: Sequence[TokenizedRanked], index: Sequence[int]
                  ) -> tuple[Sequences, list[tuple[int, int]]]:
        rows, groups, keys = [], [], []
        for x, i in zip(items, index):
            groups.append(list(range(len(rows), len(rows) + len(x.completion_ids))))
            rows += [(x.prompt_ids, c) for c in x.completion_ids]
            keys += [(i, k) for k in range(len(x.completion_ids))]
        return Sequences(rows, groups), keys

    def extras(self, items: Sequence[TokenizedRanked]) -> dict[str, Any]:
        return {"group_sizes": [len(x.completion_ids) for x in items]}

    def compute(self, policy: Policy, batch: RankedBatch, denom: int) -> tuple[torch.Tensor, Logs]:
        ref_sums = self.reference.logps(batch)
        sums, _ = policy(batch.seqs)
        losses, best, worst = [], [], []
        for pol, ref in zip(sums.split(batch.group_sizes), ref_sums.split(batch.group_sizes)):
            losses.append(plackett_luce_loss(pol[None], ref[None], beta=self.loss.beta)[0])
            r = (self.loss.beta * (pol - ref)).detach()
            best.append(r[0])
            worst.append(r[-1])
        lt, bt, wt = torch.stack(losses), torch.stack(best), torch.stack(worst)
        logs = pair_metrics(lt, bt, wt, bt, wt)
        del logs["logps/chosen"], logs["logps/rejected"]
        return lt.sum() / denom, logs


class SFTRecipe(Recipe):
    name = "sft"
    throughput_name = "examples_per_s"
    keys = ("loss", "logps/completion", "entropy", "mean_token_accuracy")

    def sequences(self, items: Sequence[TokenizedSFT], index: Sequence[int]
                  ) -> tuple[Sequences, list[tuple[int, int]]]:
        return Sequences.ungrouped([(x.prompt_ids, x.completion_ids) for x in items]), [(i, 0) for i in index]

    def units(self, items: Sequence[TokenizedSFT]) -> int:
        return sum(len(x.completion_ids) for x in items)

    def compute(self, policy: Policy, batch: Batch, denom: int) -> tuple[torch.Tensor, Logs]:
        sums, lengths, stats = policy(batch.seqs, stats=True)
        nll = -sums.sum()
        return nll / denom, {"loss": (_sum(nll), lengths.sum()), "logps/completion": (_sum(sums), len(lengths)),
                             **token_metrics(stats, lengths)}
