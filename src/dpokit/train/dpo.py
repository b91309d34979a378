"""DPO stage: policy against a frozen reference, one preference loss from the registry.

Read top to bottom: load, tokenize, build the recipe (one forward for chosen+rejected of the
policy, one no-grad forward of the reference through the same code path and dtype), train,
evaluate, export.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dpokit.config import Config, ConfigError
from dpokit.data.collate import collate_pairs
from dpokit.data.formats import load_preferences
from dpokit.data.tokenize import TokenizedPair, tokenize_pair
from dpokit.logprobs import sequence_logps
from dpokit.losses import LossSpec, get_loss
from dpokit.models import autocast, freeze, load_model, load_tokenizer
from dpokit.train import common
from dpokit.train.loop import Logs, Recipe, to_device, train

log = logging.getLogger("dpokit")

DEFAULT_LR = 1e-6


def loss_options(cfg: Config, spec: LossSpec) -> dict[str, float]:
    """Options the chosen loss accepts; a set option the loss would ignore is an error."""
    opts = {}
    if cfg.loss.label_smoothing:
        if "label_smoothing" not in spec.options:
            raise ConfigError(f"loss.label_smoothing has no effect on loss '{cfg.loss.name}'; remove it")
        opts["label_smoothing"] = cfg.loss.label_smoothing
    return opts


def pair_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], spec: LossSpec, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs [B] each: summed, or per-token means for length-normalized losses."""
    sums, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                   batch["completion_mask"], chunk_tokens=chunk_tokens)
    if spec.length_normalized:
        sums = sums / lengths.clamp(min=1)
    chosen, rejected = sums.chunk(2)
    return chosen, rejected


def pair_metrics(
    losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
) -> Logs:
    """Per-pair metrics as (sum, count), under the field's usual names."""
    n = losses.shape[0]
    s = lambda x: float(x.detach().float().sum())  # noqa: E731
    return {
        "loss": (s(losses), n),
        "rewards/chosen": (s(chosen_rewards), n),
        "rewards/rejected": (s(rejected_rewards), n),
        "rewards/accuracies": (s((chosen_rewards > rejected_rewards).float()), n),
        "rewards/margins": (s(chosen_rewards - rejected_rewards), n),
        "logps/chosen": (s(policy_chosen), n),
        "logps/rejected": (s(policy_rejected), n),
    }


def dpo_recipe(cfg: Config, reference: torch.nn.Module | None, pad_id: int) -> Recipe:
    spec = get_loss(cfg.loss.name)
    options = loss_options(cfg, spec)
    chunk = cfg.train.logit_chunk_tokens

    def compute(model: torch.nn.Module, batch: dict[str, torch.Tensor], denom: int) -> tuple[torch.Tensor, Logs]:
        pc, pr = pair_logps(model, batch, spec, chunk)
        if reference is not None:
            with torch.no_grad():
                rc, rr = pair_logps(reference, batch, spec, chunk)
        else:
            rc = rr = torch.zeros_like(pc)
        losses, cr, rj = spec.fn(pc, pr, rc, rr, beta=cfg.loss.beta, **options)
        return losses.sum() / denom, pair_metrics(losses, cr, rj, pc, pr)

    return Recipe(
        name="dpo", collate=lambda items: collate_pairs(items, pad_id), units=len, compute=compute,
        throughput_name="pairs_per_s", postfix=("loss", "rewards/margins", "rewards/accuracies"),
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, recipe: Recipe, pairs: Sequence[TokenizedPair], batch_size: int,
    device: torch.device, precision: str,
) -> dict[str, float]:
    """Mean loss and reward metrics over a held-out set, under ``eval/`` names."""
    model.eval()
    acc: Logs = {}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        with autocast(device, precision):
            _, logs = recipe.compute(model, to_device(recipe.collate(chunk), device), len(chunk))
        for k, (s, c) in logs.items():
            s0, c0 = acc.get(k, (0.0, 0.0))
            acc[k] = (s0 + s, c0 + c)
    model.train()
    return {f"eval/{k}": s / c for k, (s, c) in acc.items() if c}


def run_dpo(cfg: Config, resume: str | None = None, policy: Any = None, tokenizer: Any = None) -> Path:
    """Train with DPO (or any registered loss); returns the ``final/`` directory."""
    stage = common.begin(cfg, resume)
    spec = get_loss(cfg.loss.name)
    loss_options(cfg, spec)  # refuse options the loss would ignore, before loading anything
    tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    examples = load_preferences(cfg.data.train_files, cfg.data.split)
    pairs, _ = common.tokenize_all(examples, tokenize_pair, tokenizer, cfg, "train", stage.run_dir)
    eval_pairs: list[TokenizedPair] = []
    if cfg.data.eval_files:
        eval_examples = load_preferences(cfg.data.eval_files, cfg.data.split)
        eval_pairs, _ = common.tokenize_all(eval_examples, tokenize_pair, tokenizer, cfg, "eval", stage.run_dir)

    policy = policy if policy is not None else load_model(cfg.model.name_or_path, cfg.model.trust_remote_code)
    policy.to(stage.device)
    reference = None
    if spec.needs_reference:
        if cfg.model.ref_name_or_path:
            reference = load_model(cfg.model.ref_name_or_path, cfg.model.trust_remote_code)
        else:
            reference = copy.deepcopy(policy)
        reference = freeze(reference).to(stage.device)

    recipe = dpo_recipe(cfg, reference, tokenizer.pad_token_id)
    lr = cfg.train.lr if cfg.train.lr is not None else DEFAULT_LR
    result = train(cfg, policy, recipe, pairs, stage.run_dir, stage.device, stage.precision, lr,
                   resume_from=stage.resume_from)
    metrics = dict(result.last_metrics)
    if eval_pairs:
        ev = evaluate(policy, recipe, eval_pairs, cfg.train.batch_size, stage.device, stage.precision)
        common.append_metrics(stage.run_dir, {"step": result.steps, **ev})
        log.info("eval: %s", " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
        metrics.update(ev)
    card = common.model_card(cfg, "dpo", cfg.model.name_or_path, metrics)
    return common.finish(stage, policy, tokenizer, card)
