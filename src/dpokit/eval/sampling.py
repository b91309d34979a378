"""Seeded, batched sampling from a model, and scoring of samples under a model.

Sampling at temperature 1 with top-k and top-p off draws from the model's own distribution,
which is what a KL estimate from samples requires.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpokit.data.collate import Sequences, layout
from dpokit.data.formats import Text
from dpokit.data.tokenize import encode_chat, encode_text
from dpokit.logprobs import LogProbs
from dpokit.models import autocast
from dpokit.progress import Progress


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str


def prompt_ids(tokenizer: Any, prompt: Text) -> list[int]:
    """The prompt's ids as training encodes them: special-token strings in the text stay text."""
    if isinstance(prompt, list):
        return encode_chat(tokenizer, prompt, add_generation_prompt=True)
    return encode_text(tokenizer, prompt)


@torch.no_grad()
def sample(
    model: Any, tokenizer: Any, prompts: Sequence[Text], *, n: int = 1, max_new_tokens: int = 64,
    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
    device: torch.device | None = None, precision: str = "fp32", what: str = "sampling",
) -> list[Sample]:
    """n samples per prompt (prompt-major order); greedy when temperature == 0. Progress (``what``) counts
    samples."""
    return sample_ids(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], n=n,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      batch_size=batch_size, device=device, precision=precision, what=what)


@torch.no_grad()
def sample_ids(
    model: Any, tokenizer: Any, encoded: Sequence[list[int]], *, n: int = 1, max_new_tokens: int = 64,
    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
    device: torch.device | None = None, precision: str = "fp32", what: str = "sampling",
) -> list[Sample]:
    """As ``sample``, from prompts already encoded (``prompt_ids``): the same samples for the same ids."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    jobs = [(i, list(ids)) for i, ids in enumerate(encoded) for _ in range(n)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[Sample] = []
    with Progress(what, total=len(jobs), unit="sample") as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            out += _generate(model, tokenizer, chunk, gen, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, device=device, precision=precision)
            bar.update(len(chunk))
    model.train(was_training)
    return out


def _generate(model: Any, tokenizer: Any, chunk: list[tuple[int, list[int]]], gen: torch.Generator, *,
              max_new_tokens: int, temperature: float, top_p: float, device: torch.device,
              precision: str) -> list[Sample]:
    """One batch of ``chunk`` (prompt index, prompt ids), left-padded; its seed drawn from ``gen``."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(ids) for _, ids in chunk)
    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for r, (_, ids) in enumerate(chunk):  # left padding for generation
        input_ids[r, width - len(ids):] = torch.tensor(ids)
        attention[r, width - len(ids):] = 1
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    with autocast(device, precision):
        seqs = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            pad_token_id=pad, eos_token_id=eos, **kwargs,
        )
    out = []
    for r, (i, ids) in enumerate(chunk):
        completion = seqs[r, width:].tolist()
        if eos in completion:
            completion = completion[: completion.index(eos) + 1]
        text = tokenizer.decode(completion, skip_special_tokens=True)
        out.append(Sample(i, ids, completion, text))
    return out


@torch.no_grad()
def score(
    model: Any, samples: Sequence[Sample], *, batch_size: int = 32, pad_id: int = 0,
    device: torch.device | None = None, precision: str = "fp32", what: str = "scoring samples",
) -> torch.Tensor:
    """log pi(completion | prompt) summed over tokens, [len(samples)] fp32 on CPU."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    logprobs = LogProbs(model)
    out = []
    with Progress(what, total=len(samples), unit="sample") as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            rows = Sequences.ungrouped([(s.prompt_ids, s.completion_ids) for s in chunk])
            with autocast(device, precision):
                sums, _ = logprobs(layout(rows, "auto", pad_id).to(device))
            out.append(sums.float().cpu())
            bar.update(len(chunk))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@dataclass(frozen=True)
class KLEstimate:
    """KL(policy || reference) from policy samples: mean of log pi(y|x) - log pi_ref(y|x)."""

    sequence: float
    sequence_stderr: float
    per_token: float
    samples: int


def kl_from_logps(policy_logps: torch.Tensor, ref_logps: torch.Tensor, lengths: Sequence[int]) -> KLEstimate:
    """Monte-Carlo KL from y ~ policy; unbiased at sequence level, per token = total / tokens."""
    d = (policy_logps - ref_logps).double()
    n = d.numel()
    stderr = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    tokens = max(1, int(sum(lengths)))
    return KLEstimate(float(d.mean()), stderr, float(d.sum() / tokens), n)
