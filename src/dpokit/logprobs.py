"""Per-sequence log-probabilities of completion tokens, from hidden states.

For row i with completion positions C_i, the sequence log-prob is

    log pi(y_i | x_i) = sum_{t in C_i} log softmax(W h_{i, t-1})[y_{i, t}]

where h is the last hidden state and W the LM head. Only completion positions go through the
LM head (prompt and padding positions never do), in chunks of ``chunk_tokens`` rows, and the
log-softmax runs in fp32: the temporary logits are at most [chunk_tokens, vocab], never
[batch, seq, vocab].
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def completion_targets(
    input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions whose next token is a completion token.

    Returns (rows [M], positions [M], targets [M]): hidden state ``h[rows, positions]``
    predicts token ``targets`` = ``input_ids[rows, positions + 1]``.
    """
    mask = completion_mask[:, 1:].bool()
    rows, pos = mask.nonzero(as_tuple=True)
    return rows, pos, input_ids[:, 1:][mask]


def _chunk_logps(lm_head: torch.nn.Module, h: torch.Tensor, tgt: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = lm_head(h).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, tgt[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps_from_hidden(
    hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, *,
    chunk_tokens: int = 1024, softcap: float | None = None,
) -> torch.Tensor:
    """log p(target | hidden) for M hidden states [M, H] and targets [M] -> [M] in fp32.

    With gradients on, each chunk's logits are recomputed in the backward pass instead of being
    kept for it, so logit memory stays at one chunk [chunk_tokens, vocab] through the whole step.
    """
    out = []
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, tgt = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if recompute:
            out.append(checkpoint(_chunk_logps, lm_head, h, tgt, softcap, use_reentrant=False))
        else:
            out.append(_chunk_logps(lm_head, h, tgt, softcap))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, completion_mask: torch.Tensor,
    *, chunk_tokens: int = 1024, position_ids: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths per sequence, both [N] (fp32 and long).

    Padded batches: ``input_ids``, ``attention_mask``, ``completion_mask`` [N, T], one sequence a row.
    Packed batches (``dpokit.data.collate.pack_rows``): rows hold several sequences; pass
    ``position_ids`` and ``seq_ids`` [R, W] and ``num_seqs`` (the attention mask is built by the
    model from the restarting positions). The mean log-prob is ``sums / lengths``.
    """
    decoder = model.get_decoder()
    if position_ids is not None:
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows, pos, targets = completion_targets(input_ids, completion_mask)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    tok = token_logps_from_hidden(
        hidden[rows, pos], model.get_output_embeddings(), targets, chunk_tokens=chunk_tokens, softcap=softcap
    )
    owner = rows if seq_ids is None else seq_ids[:, 1:][completion_mask[:, 1:].bool()]
    n = input_ids.shape[0] if seq_ids is None else int(num_seqs if num_seqs is not None else seq_ids.max() + 1)
    sums = torch.zeros(n, dtype=torch.float32, device=tok.device).index_add(0, owner, tok)
    lengths = torch.bincount(owner, minlength=n)
    return sums, lengths


def shared_prompt_logps(model: Any, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs for ``shared_prompt_rows`` batches: explicit (hidden position -> target) pairs, [2B] out."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                 attention_mask=batch["attention_mask_4d"], use_cache=False).last_hidden_state
    softcap = getattr(model.config, "final_logit_softcapping", None)
    tok = token_logps_from_hidden(hidden[batch["hid_row"], batch["hid_pos"]], model.get_output_embeddings(),
                                  batch["targets"], chunk_tokens=chunk_tokens, softcap=softcap)
    n, owner = int(batch["num_seqs"]), batch["owner"]
    sums = torch.zeros(n, dtype=torch.float32, device=tok.device).index_add(0, owner, tok)
    return sums, torch.bincount(owner, minlength=n)


def batch_logps(model: Any, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` for a collated batch: padded, packed, or prompt-shared."""
    if "hid_pos" in batch:
        return shared_prompt_logps(model, batch, chunk_tokens)
    if "seq_ids" in batch:
        return sequence_logps(model, batch["input_ids"], None, batch["completion_mask"], chunk_tokens=chunk_tokens,
                              position_ids=batch["position_ids"], seq_ids=batch["seq_ids"],
                              num_seqs=int(batch["num_seqs"]))
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                          chunk_tokens=chunk_tokens)
