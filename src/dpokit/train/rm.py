"""Reward-model stage (``dpokit rm``): a Bradley-Terry reward model trained on preference pairs.

The model is the ``...ForSequenceClassification`` of the policy's architecture (``dpokit.reward_model``):
the causal LM's decoder with a one-output linear head read at the last non-pad token. The loss is the
Bradley-Terry negative log-likelihood of the preferences (Ouyang et al. 2022, Eq. 1; the DPO paper's Eq. 2):

    L = -(1 / B) sum_i log sigma(r(x_i, y_w,i) - r(x_i, y_l,i)).

It runs through the one training loop (``dpokit.train.loop``): the ``RewardScores`` module is what a parallel
engine wraps, the recipe lays pairs out like DPO's (chosen rows, then rejected rows; chosen and rejected of a
pair share their prompt, so ``shared_prompt`` applies), and checkpoints, resume, torchrun, snapshots and
held-out evaluation (``eval/accuracy``: the held-out pair accuracy) come from the loop. ``final/`` is a Hugging
Face sequence-classification model that ``--judge-rm`` loads; ``config.json`` records ``dpokit_reward_model``,
so the judge tokenizes (prompt, completion) as training did (jointly, EOS appended).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dpokit import distributed
from dpokit.config import Config, ConfigError
from dpokit.data.collate import Sequences
from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import ONE, Dist
from dpokit.models import load_tokenizer
from dpokit.reward_model import RewardScores, load_reward_model, reward_row
from dpokit.safety import redact
from dpokit.train.build import load_stage_items
from dpokit.train.loop import Job, forward_budget, run_stage, step_order
from dpokit.train.recipes import Batch, Logs, Recipe, _sum
from dpokit.train.rundir import open_session

log = logging.getLogger("dpokit")

DEFAULT_LR = 1e-5
# what a dpokit reward model's config.json says about its inputs (read by eval.judges.RewardModelJudge)
INPUT_FORMAT = {"version": 1, "input": "prompt and completion tokenized jointly as dpokit training does, EOS "
                "appended; the score is read at the last non-pad token"}


class RewardRecipe(Recipe):
    """Bradley-Terry on pairs: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] through ``RewardScores``."""

    name = "rm"
    postfix = ("loss", "accuracy", "margin")
    keys = ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected")

    def sequences(self, items: Sequence[TokenizedPair], index: Sequence[int]
                  ) -> tuple[Sequences, list[tuple[int, int]]]:
        b = len(items)
        rows = [reward_row(x.prompt_ids, x.chosen_ids, self.pad_id) for x in items]
        rows += [reward_row(x.prompt_ids, x.rejected_ids, self.pad_id) for x in items]
        # chosen and rejected share a prompt (a group) unless reward_row had to move a token into it
        groups = [[i, b + i] if rows[i][0] == rows[b + i][0] else [i] for i in range(b)]
        groups += [[b + i] for i in range(b) if rows[i][0] != rows[b + i][0]]
        return Sequences(rows, groups), [(i, 0) for i in index] + [(i, 1) for i in index]

    def compute(self, policy: Any, batch: Batch, denom: int) -> tuple[torch.Tensor, Logs]:
        scores = policy(batch.seqs)
        chosen, rejected = scores.chunk(2)
        margin = chosen - rejected
        losses = -F.logsigmoid(margin)
        n = losses.shape[0]
        logs: Logs = {
            "loss": (_sum(losses), n), "accuracy": (_sum((margin > 0).float()), n), "margin": (_sum(margin), n),
            "mean_reward": (_sum(scores), 2 * n), "rewards/chosen": (_sum(chosen), n),
            "rewards/rejected": (_sum(rejected), n),
        }
        return losses.sum() / denom, logs


def reward_module(cfg: Config, model: Any, place: Dist = ONE) -> torch.nn.Module:
    """The reward model as the RewardScores module every forward goes through, in the parallel engine."""
    t = cfg.train
    if t.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = distributed.wrap(RewardScores(model), place, t.fsdp_bf16_params)
    if t.compile:
        module.compile()
    return module


def build_rm(cfg: Config, resume: str | None = None, model: Any = None, tokenizer: Any = None,
             overwrite: bool = False, extend: bool = False) -> Job:
    """Everything a reward-model run needs, ready for ``dpokit.train.loop.fit``."""
    if cfg.model.lora_r:
        raise ConfigError("model.lora_r: `dpokit rm` trains all weights (LoRA for reward models is not supported)")
    session = open_session(cfg, resume, "rm", overwrite, extend)
    place, t = session.dist, cfg.train
    tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    items = load_stage_items(cfg, "paired", cfg.data.train_files, tokenizer, "train", session.run_dir, place)
    eval_items = load_stage_items(cfg, "paired", cfg.data.eval_files, tokenizer, "eval", session.run_dir, place) \
        if cfg.data.eval_files else []
    pad = tokenizer.pad_token_id
    if model is None:
        model = load_reward_model(cfg.model.name_or_path, pad, cfg.model.trust_remote_code)
    model.config.dpokit_reward_model = dict(INPUT_FORMAT)
    model.to(session.device)
    recipe = RewardRecipe(pad, t.layout)
    return Job(session=session, policy=reward_module(cfg, model, place), recipe=recipe, items=items,
               order=step_order(cfg, len(items), place, [recipe.cost(x) for x in items],
                                forward_budget(cfg, session.device)),
               lr=t.lr if t.lr is not None else DEFAULT_LR, tokenizer=tokenizer,
               eval_recipe=recipe if eval_items else None, eval_items=eval_items,
               eval_costs=[recipe.cost(x) for x in eval_items])


def reward_card(cfg: Config, metrics: dict[str, float], lr: float) -> str:
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    held_out = f"\n- **Held-out pair accuracy:** {metrics['eval/accuracy']:.4f} on {', '.join(cfg.data.eval_files)}" \
        if "eval/accuracy" in metrics else ""
    return f"""---
library_name: transformers
tags: [dpokit, reward-model]
base_model: {cfg.model.name_or_path}
---
# Bradley-Terry reward model trained with `dpokit rm`

- **Architecture:** a sequence-classification head (one label) on `{cfg.model.name_or_path}`; the score is read at
  the last non-pad token of prompt + completion (EOS appended to the completion, as in training)
- **Loss:** -log sigmoid(r(chosen) - r(rejected))
- **Training data:** {', '.join(cfg.data.train_files) or '(none)'}{held_out}
- **Steps:** {cfg.train.max_steps or f"{cfg.train.epochs or 1} epoch(s)"}, batch {cfg.train.batch_size}, lr \
{lr:g}, seed {cfg.train.seed}, precision {cfg.precision}

Scores: `dpokit eval|pairs --judge-rm THIS_DIRECTORY`, or `AutoModelForSequenceClassification` (logits[:, 0]).
Last logged metrics: `{shown}`
"""


def run_rm(cfg: Config, resume: str | None = None, overwrite: bool = False, extend: bool = False) -> Path:
    """Train a reward model; returns the ``final/`` directory (its model card says what it is)."""

    def card(job: Job, result: Any, final: Path) -> None:
        if job.session.dist.main:  # the held-out metrics finish() logged are the last line of metrics.jsonl
            metrics = dict(result.last_metrics)
            lines = (job.session.run_dir / "metrics.jsonl").read_text().splitlines()
            if job.eval_items and lines:
                metrics.update({k: v for k, v in json.loads(lines[-1]).items() if k.startswith("eval/")})
            (final / "README.md").write_text(redact(reward_card(job.session.cfg, metrics, job.lr)))

    return run_stage(build_rm, cfg, resume, overwrite, extend, then=card)
