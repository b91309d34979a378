"""Batches: chosen and rejected of a batch stacked so one forward pass computes both.

A batch of B pairs becomes ``input_ids``/``attention_mask``/``completion_mask`` of shape
[2B, T]: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded to the
longest row. ``completion_mask[i, t] = 1`` where token t of row i belongs to the completion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpokit.data.tokenize import TokenizedPair, TokenizedSFT


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt_ids, completion_ids) rows -> right-padded input_ids, attention_mask, completion_mask [N, T]."""
    width = max(len(p) + len(c) for p, c in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids = p + c
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        completion[i, len(p) : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    rows = [(x.prompt_ids, x.chosen_ids) for x in pairs] + [(x.prompt_ids, x.rejected_ids) for x in pairs]
    return pad_rows(rows, pad_id)


def collate_sft(items: Sequence[TokenizedSFT], pad_id: int) -> dict[str, torch.Tensor]:
    return pad_rows([(x.prompt_ids, x.completion_ids) for x in items], pad_id)
