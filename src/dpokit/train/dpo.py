"""Preference stage: the policy against a reference, any loss of the registry.

Read top to bottom: resolve the loss (``Config.validate`` has refused every option it would ignore),
open the run, load and tokenize the data, load the policy, take what the reference needs from the
starting weights (their hash for the cache, or a frozen copy), wrap the policy as the ``LogProbs`` module
in the parallel engine, build the reference (``build_reference``: cached, frozen model, adapters off, or
uniform), pick the recipe for the data kind, and hand the ``Job`` to the loop.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from dpokit import refcache
from dpokit.config import Config
from dpokit.logprobs import unwrap
from dpokit.losses import ResolvedLoss, resolve_loss
from dpokit.models import load_model, load_tokenizer
from dpokit.reference import Reference, Split, build_reference, reference_kind
from dpokit.train.build import frozen_module, load_stage_items, policy_module
from dpokit.train.loop import Job, eval_micro_batches, forward_budget, run_stage, step_order, total_steps
from dpokit.train.recipes import PairedRecipe, RankedRecipe, Recipe, UnpairedRecipe
from dpokit.train.rundir import open_session

log = logging.getLogger("dpokit")

DEFAULT_LR = 1e-6


def data_kind(loss: ResolvedLoss) -> str:
    """What each training example is: a pair, an unpaired labelled completion (KTO), or a ranked group."""
    return "unpaired" if not loss.paired else "ranked" if loss.plackett_luce else "paired"


def make_recipe(loss: ResolvedLoss, reference: Reference | None, pad_id: int, layout: str) -> Recipe:
    cls = {"paired": PairedRecipe, "unpaired": UnpairedRecipe, "ranked": RankedRecipe}[data_kind(loss)]
    return cls(loss, reference, pad_id, layout)


class DisplacementWatch:
    """Likelihood displacement: the chosen response's log-prob falls below the reference's while margins grow.

    Measured on the same batch (log pi(y_w) - log pi_ref(y_w), mean over pairs), so it is not
    confused by batches of different lengths. Marks every such metrics record; warns once.
    """

    def __init__(self, nats: float):
        self.nats, self.warned, self.first_margin = nats, False, None

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.nats or "logratio/chosen" not in record:
            return
        margin = record.get("rewards/margins", 0.0)
        if self.first_margin is None:
            self.first_margin = margin
        fallen = record["logratio/chosen"]
        if fallen < -self.nats and margin > max(self.first_margin, 0.0):
            record["likelihood_displacement"] = True
            if not self.warned:
                self.warned = True
                log.warning(
                    "likelihood displacement at step %d: log pi(chosen) is %.2f nats below the reference's "
                    "while the reward margin grew to %.3f (from %.3f). The chosen responses are getting less "
                    "likely even as they win. Consider loss.rpo_alpha (an NLL term on chosen) or "
                    "loss.dpop_lambda (DPO-Positive).", record["step"], -fallen, margin, self.first_margin)


def build_dpo(cfg: Config, resume: str | None = None, model: Any = None, tokenizer: Any = None,
              overwrite: bool = False, extend: bool = False) -> Job:
    """Everything a preference run needs, ready for ``dpokit.train.loop.fit``; ``model``/``tokenizer`` replace
    loading ``model.name_or_path`` (benchmarks, tests)."""
    session = open_session(cfg, resume, "dpo", overwrite, extend)
    place, t = session.dist, cfg.train
    loss = resolve_loss(cfg.loss)
    kind = data_kind(loss)
    tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    items = load_stage_items(cfg, kind, cfg.data.train_files, tokenizer, "train", session.run_dir, place)
    eval_items = load_stage_items(cfg, kind, cfg.data.eval_files, tokenizer, "eval", session.run_dir, place) \
        if cfg.data.eval_files else []
    model = model if model is not None else load_model(cfg.model.name_or_path, cfg.model.trust_remote_code)
    model.to(session.device)

    ref_kind = reference_kind(cfg, loss)
    # what must be taken from the starting weights before the policy is wrapped (and sharded)
    start_hash = refcache.model_fingerprint(model) if ref_kind == "cached" else ""
    copied = frozen_module(cfg, copy.deepcopy(model), place) if ref_kind == "frozen copy" else None
    policy = policy_module(cfg, model, place)

    pad, layout = tokenizer.pad_token_id, t.layout
    probe = make_recipe(loss, None, pad, layout)  # lays out the forwards the cache is computed over
    budget = forward_budget(cfg, session.device, probe.splittable)
    order = step_order(cfg, len(items), place, [probe.cost(x) for x in items], budget)
    eval_costs = [probe.cost(x) for x in eval_items]

    def split(examples: list[Any], per_rank: Any) -> Split:
        """This rank's micro-batches (dataset positions per rank from ``per_rank(rank)``), laid out."""
        mine = per_rank(place.rank)
        return Split(len(examples), [probe.collate([examples[i] for i in idx], idx) for idx in mine],
                     max(len(per_rank(r)) for r in range(place.world)), probe.collate(examples[:1], [0]))

    steps = total_steps(cfg, order)
    splits = {"train": lambda: split(items, lambda r: order.for_rank(r).first_epoch(steps))}
    if eval_items:
        splits["eval"] = lambda: split(eval_items, lambda r: eval_micro_batches(len(eval_items), t.batch_size, r,
                                                                                place.world, eval_costs, budget))
    refs = build_reference(cfg, loss, policy=policy, model=unwrap(policy), fingerprint=lambda: start_hash,
                           frozen=lambda m: frozen_module(cfg, m, place), copied=copied, splits=splits,
                           device=session.device, precision=session.precision, place=place)
    log.info("reference: %s", refs["train"].kind)
    observers = [DisplacementWatch(t.displacement_nats)] if loss.reference and loss.paired else []
    return Job(session=session, policy=policy, recipe=make_recipe(loss, refs["train"], pad, layout), items=items,
               order=order, lr=t.lr if t.lr is not None else DEFAULT_LR, tokenizer=tokenizer,
               eval_recipe=make_recipe(loss, refs["eval"], pad, layout) if eval_items else None,
               eval_items=eval_items, eval_costs=eval_costs, observers=observers)


def run_dpo(cfg: Config, resume: str | None = None, overwrite: bool = False, extend: bool = False) -> Path:
    """Train with DPO (or any registered loss); returns the ``final/`` directory."""
    return run_stage(build_dpo, cfg, resume, overwrite, extend)
