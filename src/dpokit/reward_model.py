"""Reward-model scores: the one way a Bradley-Terry reward model is called (training, evaluation, judging).

A reward model is the Hugging Face ``...ForSequenceClassification`` of a causal-LM architecture with one label:
a linear head ``score`` on the decoder's last hidden state, read at the **last non-pad token** of prompt +
completion (the rightmost position whose id is not ``config.pad_token_id``: Hugging Face's convention, so the
saved model scores the same in ``AutoModelForSequenceClassification``'s own forward):

    r(x, y) = w^T h_t,   t = the last position of [x; y] whose token is not the pad id.

``RewardScores`` is an ``nn.Module`` whose ``forward(batch)`` takes a layout batch (``dpokit.data.collate``:
padded, packed or shared-prompt) and returns ``scores [N] fp32``; a parallel wrapper (DDP, FSDP2) or
``torch.compile`` wraps exactly it, as ``LogProbs`` for the policy. It reads each sequence's score at the
hidden state that the layout names for the sequence's **last target**: ``reward_rows`` lays every sequence
out as ``(prompt, completion cut after its last non-pad token, then one pad token)``, so that last target is
the appended pad and the hidden state predicting it is the one at the last non-pad token. (With EOS = pad, as
in SmolLM2, the appended pad is the EOS that was cut: the row is the sequence itself.) The appended token is
never attended to by the token read (causal attention), so it changes nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from dpokit.data.collate import LayoutBatch, Row

log = logging.getLogger("dpokit")


def reward_row(prompt_ids: list[int], completion_ids: list[int], pad_id: int) -> Row:
    """(prompt, completion) -> the row ``RewardScores`` reads: the completion cut after its last non-pad token,
    then one pad token. An empty prompt takes the completion's first token (a sequence's first token is never a
    target). A completion of pad tokens only is read at the prompt's last token."""
    keep = len(completion_ids)
    while keep and completion_ids[keep - 1] == pad_id:
        keep -= 1
    head = completion_ids[:keep]
    if not prompt_ids:
        if not head:
            raise ValueError("a reward-model sequence needs at least one token that is not the pad id")
        prompt_ids, head = head[:1], head[1:]
    return list(prompt_ids), head + [pad_id]


def last_targets(batch: LayoutBatch) -> torch.Tensor:
    """[N] index of each sequence's last target (targets of a sequence are contiguous, in position order)."""
    m = torch.arange(batch.owner.shape[0], device=batch.owner.device)
    out = torch.full((batch.num_seqs,), -1, dtype=torch.long, device=batch.owner.device)
    return out.scatter_reduce(0, batch.owner, m, reduce="amax", include_self=True)


class RewardScores(torch.nn.Module):
    """``forward(batch) -> scores [N] fp32``: the reward of every sequence of a layout batch (rows from
    ``reward_row``). ``model`` is a Hugging Face ``...ForSequenceClassification`` with one label."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, batch: LayoutBatch) -> torch.Tensor:
        hidden = self.model.base_model(**batch.decoder_inputs(), use_cache=False).last_hidden_state
        last = last_targets(batch)
        h = hidden[batch.hid_row[last], batch.hid_pos[last]]  # [N, H]
        return self.model.score(h).float()[:, 0]


def is_reward_model(name_or_path: str) -> bool:
    """Does ``name_or_path`` hold a sequence-classification model (a reward model) rather than a causal LM?"""
    cfg = Path(name_or_path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_reward_model(name_or_path: str, pad_id: int, trust_remote_code: bool = False) -> Any:
    """A float32 one-label ``...ForSequenceClassification`` to train: loaded as is when ``name_or_path`` already is
    one (continued training), else built from the causal LM of ``name_or_path`` (any source ``load_model`` takes:
    HF directory, hub id, GGUF, the embedded model): its decoder weights, a fresh ``score`` head (initialized by
    the architecture under the run's seed). ``config.pad_token_id`` is set to ``pad_id``: it decides where the
    score is read."""
    from transformers import AutoModelForSequenceClassification

    from dpokit.models import ModelLoadError, disable_dropout, load_model

    if is_reward_model(name_or_path):
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                                   dtype=torch.float32)
        if model.config.num_labels != 1:
            raise ModelLoadError(f"{name_or_path}: a reward model has one label; this one has "
                                 f"{model.config.num_labels}")
    else:
        causal = load_model(name_or_path, trust_remote_code)
        config = causal.config
        config.num_labels, config.architectures = 1, None
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32,
                                                               trust_remote_code=trust_remote_code)
        missing, unexpected = model.base_model.load_state_dict(causal.get_decoder().state_dict(), strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"{name_or_path}: the decoder of {type(causal).__name__} does not fit "
                                 f"{type(model).__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})")
        del causal
    model.config.pad_token_id = pad_id
    disable_dropout(model)
    return model
