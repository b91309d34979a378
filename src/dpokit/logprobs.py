"""Per-sequence log-probabilities of completion tokens: the one way a model is called during training.

For sequence i with completion positions C_i,

    log pi(y_i | x_i) = sum_{t in C_i} log softmax(W h_{t-1})[y_t]

where h is the decoder's last hidden state and W the LM head. ``LogProbs`` is an ``nn.Module`` whose
``forward(batch)`` takes a layout batch (``dpokit.data.collate``: padded, packed or shared-prompt) and
returns ``(sums [N] fp32, lengths [N] long)``. The policy, every reference model and evaluation go
through it, so a parallel wrapper (DDP, FSDP2) or ``torch.compile`` wraps exactly this module and sees
every forward. Its parameters are the wrapped model's, under the prefix ``model.``; checkpoints store
the unwrapped model's own names (``unwrap``), the same in every mode.

Only completion positions go through the LM head (prompt and padding positions never do), in chunks
of ``chunk_tokens`` rows, with the log-softmax in fp32: the temporary logits are at most
[chunk_tokens, vocab], never [batch, seq, vocab]. With gradients on and more than one chunk, each
chunk's logits are recomputed in the backward pass, so logit memory stays at one chunk through the
whole step; a single chunk keeps its logits for the backward instead (the same memory, one LM-head
matmul and one log-softmax fewer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from dpokit.data.collate import LayoutBatch


def _chunk_logps(lm_head: torch.nn.Module, h: torch.Tensor, tgt: torch.Tensor, softcap: float | None,
                 stats: bool = False) -> Any:
    logits = lm_head(h).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logz = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, tgt[:, None]).squeeze(-1) - logz
    if not stats:
        return logps
    with torch.no_grad():  # for metrics only: [M, 3] entropy, mean logit, target is the argmax
        z = logits.detach()
        entropy = logz.detach() - (torch.softmax(z, dim=-1) * z).sum(-1)
        extra = torch.stack([entropy, z.mean(-1), (z.argmax(-1) == tgt).float()], dim=-1)
    return logps, extra


def token_stats_from_hidden(
    hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, *,
    chunk_tokens: int = 1024, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``token_logps_from_hidden`` ([M] log-probs, the same numbers), plus [M, 3] fp32 statistics of each
    next-token distribution p = softmax(logits), without gradient: entropy -sum_v p_v log p_v, the mean logit
    over the vocabulary, and 1.0 where the target is the argmax (TRL's ``entropy``, ``logits/*`` and
    ``mean_token_accuracy`` inputs)."""
    out, extra = [], []
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk_tokens
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, tgt = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if recompute:
            lp, ex = checkpoint(_chunk_logps, lm_head, h, tgt, softcap, True, use_reentrant=False)
        else:
            lp, ex = _chunk_logps(lm_head, h, tgt, softcap, True)
        out.append(lp)
        extra.append(ex)
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, 3, dtype=torch.float32)
    return torch.cat(out), torch.cat(extra)


def token_logps_from_hidden(
    hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, *,
    chunk_tokens: int = 1024, softcap: float | None = None,
) -> torch.Tensor:
    """log p(target | hidden) for M hidden states [M, H] and targets [M] -> [M] in fp32."""
    out = []
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk_tokens
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, tgt = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if recompute:
            out.append(checkpoint(_chunk_logps, lm_head, h, tgt, softcap, use_reentrant=False))
        else:
            out.append(_chunk_logps(lm_head, h, tgt, softcap))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class LogProbs(torch.nn.Module):
    """``forward(batch) -> (sums [N] fp32, lengths [N] long)``: summed completion log-probs per sequence.

    ``model`` is a Hugging Face causal LM (or a peft model around one). The mean log-prob is
    ``sums / lengths``.
    """

    def __init__(self, model: Any, chunk_tokens: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: LayoutBatch, stats: bool = False) -> Any:
        """``(sums [N], lengths [N])``; with ``stats=True`` also ``[N, 3]``: per sequence, the sums over its
        completion tokens of entropy, mean logit and argmax hits (``token_stats_from_hidden``), without gradient."""
        hidden = self.model.get_decoder()(**batch.decoder_inputs(), use_cache=False).last_hidden_state
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        args = (hidden[batch.hid_row, batch.hid_pos], self.model.get_output_embeddings(), batch.targets)
        if stats:
            tok, extra = token_stats_from_hidden(*args, chunk_tokens=self.chunk_tokens, softcap=softcap)
        else:
            tok = token_logps_from_hidden(*args, chunk_tokens=self.chunk_tokens, softcap=softcap)
        sums = torch.zeros(batch.num_seqs, dtype=torch.float32, device=tok.device).index_add(0, batch.owner, tok)
        if not stats:
            return sums, batch.lengths
        seq_stats = torch.zeros(batch.num_seqs, 3, dtype=torch.float32, device=tok.device).index_add(
            0, batch.owner, extra)
        return sums, batch.lengths, seq_stats


def unwrap(module: torch.nn.Module) -> Any:
    """The model a training step updates: inside a LogProbs (or a reward model's RewardScores) module, whatever wraps
    it (DDP, torch.compile), the Hugging Face model; any other module (a toy model in a test of the loop) is its own
    model."""
    from dpokit.reward_model import RewardScores

    while not isinstance(module, (LogProbs, RewardScores)):
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner
    return module.model
