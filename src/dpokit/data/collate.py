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


def pack_rows(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Padding-free packing: sequences first-fit-decreasing into rows no wider than the longest sequence.

    Returns input_ids, position_ids (restarting at 0 for every sequence), completion_mask and
    seq_ids (the index of the sequence each position belongs to, -1 on the few padding positions
    left at the end of a row), all [R, W]. There is no attention_mask: the model builds a
    block-diagonal causal mask from the restarting position_ids, so no token attends across
    sequences, and padding at a row's end is never attended by a real token.
    """
    width = max(len(p) + len(c) for p, c in seqs)
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(seqs[i][0]) + len(seqs[i][1])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    out = {k: torch.full((len(rows), width), v, dtype=torch.long)
           for k, v in (("input_ids", pad_id), ("position_ids", 0), ("completion_mask", 0), ("seq_ids", -1))}
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            p, c = seqs[i]
            ids = p + c
            n = len(ids)
            out["input_ids"][r, at : at + n] = torch.tensor(ids, dtype=torch.long)
            out["position_ids"][r, at : at + n] = torch.arange(n)
            # a sequence's first token is never a target: it has no predecessor within its sequence
            out["completion_mask"][r, at + max(len(p), 1) : at + n] = 1
            out["seq_ids"][r, at : at + n] = i
            at += n
        if at < width:  # trailing padding continues the last positions: no new sequence boundary, never a target
            out["position_ids"][r, at:] = out["position_ids"][r, at - 1] + 1 + torch.arange(width - at)
    out["attention_mask"] = (out["seq_ids"] >= 0).long()  # for token counting only; not passed to the model
    out["num_seqs"] = torch.tensor(len(seqs))
    return out


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, packing: bool = False) -> dict[str, torch.Tensor]:
    rows = [(x.prompt_ids, x.chosen_ids) for x in pairs] + [(x.prompt_ids, x.rejected_ids) for x in pairs]
    out = rows_to_batch(rows, pad_id, packing)
    if pairs and pairs[0].ref_chosen is not None:
        out["ref_logps"] = torch.tensor([x.ref_chosen for x in pairs] + [x.ref_rejected for x in pairs],
                                        dtype=torch.float32)
    return out


def rows_to_batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    return pack_rows(rows, pad_id) if packing else pad_rows(rows, pad_id)


def collate_sft(items: Sequence[TokenizedSFT], pad_id: int, packing: bool = False) -> dict[str, torch.Tensor]:
    return rows_to_batch([(x.prompt_ids, x.completion_ids) for x in items], pad_id, packing)
