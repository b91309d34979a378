"""Reference log-probs computed once and cached on disk under a content hash.

The key hashes everything the numbers depend on: the reference weights (every tensor's name,
shape, dtype and bytes) and config, the token ids of every pair, and the precision. Change any of
them and the key changes; the same run again, another epoch, or another run on the same data and
reference reuses the file. The reference model can then be freed: training holds only the policy.

Numerics: the values are computed over exactly the micro-batches of the first epoch (same
members, same layout, same code path and dtype as the policy's forward), so at step 0 the rewards
are exactly 0 and the loss exactly ln 2, in bf16 too. (Computed over other batches, bf16 noise does
not cancel: a peer that precomputes this way starts 0.02 away from ln 2 in bf16.) The batch layout
is part of the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpokit.data.collate import collate_pairs
from dpokit.data.tokenize import TokenizedPair
from dpokit.logprobs import batch_logps
from dpokit.models import autocast

log = logging.getLogger("dpokit")


def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model_hash: str, pairs: Sequence[TokenizedPair], precision: str, layout: str = "") -> str:
    h = hashlib.sha256(f"{model_hash}|{precision}|{layout}|v2".encode())
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute(reference: torch.nn.Module, pairs: Sequence[TokenizedPair], batches: Sequence[Sequence[int]],
            pad_id: int, device: torch.device, precision: str, packing: bool, chunk_tokens: int,
            shared_prompt: bool = False) -> torch.Tensor:
    """[N, 2] summed reference log-probs (chosen, rejected), through the training code path and dtype,
    over the given micro-batches (lists of pair indices covering every pair)."""
    out = torch.full((len(pairs), 2), float("nan"))
    for idx in batches:
        chunk = [pairs[i] for i in idx]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id, packing, shared_prompt).items()}
        with autocast(device, precision):
            sums, _ = batch_logps(reference, batch, chunk_tokens)
        c, r = sums.float().cpu().chunk(2)
        out[list(idx)] = torch.stack([c, r], dim=1)
    if torch.isnan(out).any():
        raise ValueError("reference cache: the batches do not cover every pair")
    return out


def attach(
    pairs: Sequence[TokenizedPair], reference: torch.nn.Module, cache_dir: Path, *,
    batches: Sequence[Sequence[int]], pad_id: int, device: torch.device, precision: str, packing: bool = False,
    chunk_tokens: int = 1024, model_hash: str | None = None, shared_prompt: bool = False,
) -> list[TokenizedPair]:
    """The pairs with ``ref_chosen``/``ref_rejected`` filled from the cache (computed and stored on a miss)."""
    layout = json.dumps({"batches": [list(b) for b in batches], "packing": packing, "shared": shared_prompt})
    key = cache_key(model_hash or model_fingerprint(reference), pairs, precision, layout)
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        logps = load_file(str(path))["logps"]
        log.info("reference log-probs: reusing %s (%d pairs)", path, len(pairs))
    else:
        logps = compute(reference, pairs, batches, pad_id, device, precision, packing, chunk_tokens, shared_prompt)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        save_file({"logps": logps.contiguous()}, str(tmp))
        os.replace(tmp, path)
        log.info("reference log-probs: computed for %d pairs, cached in %s", len(pairs), path)
    return [dataclasses.replace(p, ref_chosen=float(c), ref_rejected=float(r)) for p, (c, r) in zip(pairs, logps)]


def default_dir() -> Path:
    root = os.environ.get("DPOKIT_CACHE") or str(Path.home() / ".cache" / "dpokit")
    return Path(root) / "refcache"


def usable(loss: Any) -> bool:
    return loss.paired and not loss.plackett_luce and loss.reference
