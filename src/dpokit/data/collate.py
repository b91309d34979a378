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


def shared_prompt_rows(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair, [prompt | chosen | rejected]: the prompt is computed once for both responses.

    position_ids restart at len(prompt) for the rejected tokens; a 4D mask [B, 1, W, W] lets prompt
    tokens attend causally, chosen tokens attend to the prompt and earlier chosen tokens, rejected
    tokens to the prompt and earlier rejected tokens, never to the chosen ones. Targets are explicit
    (hid_row, hid_pos -> target, owner): the first rejected token is predicted from the last prompt
    position, not from the chosen token before it in the row. owner i is chosen i, B + i rejected i.
    """
    b = len(pairs)
    width = max(len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids) for x in pairs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, 1, width, width), dtype=torch.bool)
    real = torch.zeros((b, width), dtype=torch.long)
    hid_row, hid_pos, target, owner = [], [], [], []
    for i, x in enumerate(pairs):
        p, c, r = len(x.prompt_ids), len(x.chosen_ids), len(x.rejected_ids)
        n = p + c + r
        ids[i, :n] = torch.tensor(x.prompt_ids + x.chosen_ids + x.rejected_ids, dtype=torch.long)
        pos[i, : p + c] = torch.arange(p + c)
        pos[i, p + c : n] = torch.arange(p, p + r)
        pos[i, n:] = torch.arange(p + r, p + r + width - n)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        m = causal.clone()
        m[p + c : n, p : p + c] = False  # rejected never sees chosen
        m[n:, :] = False  # padding: attends to itself only (no empty softmax rows)
        m[n:, :].diagonal(offset=n)[:] = True
        mask[i, 0] = m
        real[i, :n] = 1
        for k in range(c):  # chosen token k predicted from position p + k - 1
            hid_row.append(i), hid_pos.append(p + k - 1), target.append(x.chosen_ids[k]), owner.append(i)
        for k in range(r):  # rejected token k from the prompt's end, then from the previous rejected token
            hid_row.append(i), hid_pos.append(p - 1 if k == 0 else p + c + k - 1)
            target.append(x.rejected_ids[k]), owner.append(b + i)
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return {"input_ids": ids, "position_ids": pos, "attention_mask_4d": mask, "attention_mask": real,
            "hid_row": t(hid_row), "hid_pos": t(hid_pos), "targets": t(target), "owner": t(owner),
            "num_seqs": torch.tensor(2 * b)}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, packing: bool = False,
                  shared_prompt: bool = False) -> dict[str, torch.Tensor]:
    rows = [(x.prompt_ids, x.chosen_ids) for x in pairs] + [(x.prompt_ids, x.rejected_ids) for x in pairs]
    out = shared_prompt_rows(pairs, pad_id) if shared_prompt else rows_to_batch(rows, pad_id, packing)
    if pairs and pairs[0].ref_chosen is not None:
        out["ref_logps"] = torch.tensor([x.ref_chosen for x in pairs] + [x.ref_rejected for x in pairs],
                                        dtype=torch.float32)
    return out


def rows_to_batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    return pack_rows(rows, pad_id) if packing else pad_rows(rows, pad_id)


def collate_sft(items: Sequence[TokenizedSFT], pad_id: int, packing: bool = False) -> dict[str, torch.Tensor]:
    return rows_to_batch([(x.prompt_ids, x.completion_ids) for x in items], pad_id, packing)
