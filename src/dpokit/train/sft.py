"""SFT stage: next-token loss on completion tokens only; its output is a DPO reference.

The loss is the mean negative log-likelihood over all completion tokens of the optimizer step:
L = -(1 / sum_i |y_i|) * sum_i log pi(y_i | x_i).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpokit.config import Config
from dpokit.models import load_model, load_tokenizer
from dpokit.train.build import load_stage_items, policy_module
from dpokit.train.loop import Job, forward_budget, run_stage, step_order
from dpokit.train.recipes import SFTRecipe
from dpokit.train.rundir import open_session

DEFAULT_LR = 2e-5


def build_sft(cfg: Config, resume: str | None = None, model: Any = None, tokenizer: Any = None,
              overwrite: bool = False, extend: bool = False) -> Job:
    session = open_session(cfg, resume, "sft", overwrite, extend)
    tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    items = load_stage_items(cfg, "sft", cfg.data.train_files, tokenizer, "train", session.run_dir, session.dist)
    model = model if model is not None else load_model(cfg.model.name_or_path, cfg.model.trust_remote_code)
    model.to(session.device)
    recipe = SFTRecipe(tokenizer.pad_token_id, cfg.train.layout)
    return Job(session=session, policy=policy_module(cfg, model, session.dist), recipe=recipe, items=items,
               order=step_order(cfg, len(items), session.dist, [recipe.cost(x) for x in items],
                                forward_budget(cfg, session.device)),
               lr=cfg.train.lr if cfg.train.lr is not None else DEFAULT_LR, tokenizer=tokenizer)


def run_sft(cfg: Config, resume: str | None = None, overwrite: bool = False, extend: bool = False) -> Path:
    """Train with SFT; returns the ``final/`` directory."""
    return run_stage(build_sft, cfg, resume, overwrite, extend)
