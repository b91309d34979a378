"""Past one machine on PyTorch's own engine: torchrun, DDP and FSDP2.

``torchrun --nproc-per-node N -m dpokit dpo ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; dpokit then
joins the process group (NCCL for CUDA tensors and gloo for CPU ones, ``cuda:nccl,cpu:gloo``; gloo alone on
CPU machines), uses ``cuda:LOCAL_RANK``, and wraps the policy's ``LogProbs`` module (the one entry point of
every forward) in the engine of ``train.distributed``:

* ``ddp``: ``DistributedDataParallel``; gradient accumulation under ``no_sync``;
* ``fsdp``: FSDP2 ``fully_shard``, one group per decoder layer plus the root on the LogProbs module, so tied
  embeddings (``lm_head`` = ``embed_tokens``) stay in the root group; ``train.fsdp_bf16_params`` adds the
  ``MixedPrecisionPolicy`` (bf16 parameters, fp32 gradient reduction), and a frozen reference is sharded
  under the same policy, so policy and reference compute alike and step 0 stays exactly ln 2.

``train.distributed=auto`` (the default) is DDP under torchrun and no wrapper in one process; naming an engine
in one process runs it on a world of one (the same code path, e.g. to resume a sharded run on one machine).

The contract: a world-N run equals the world-1 run with the same global batch (see ``dpokit.train.loop``).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("dpokit")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size, local rank, and the engine wrapping the policy (None: none)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    engine: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group exists (every collective below is a no-op without one)."""
        return self.engine is not None and dist.is_available() and dist.is_initialized()


ONE = Dist()
_OWNED: list[bool] = [False]  # whether dpokit made the process group (and so leaves it at exit)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(engine_setting: str, timeout_s: float, device_setting: str = "auto") -> tuple[Dist, torch.device | None]:
    """Join (or make) the process group when running under torchrun or when an engine is named; returns the
    process's place and its device (None: pick as usual)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and engine_setting == "auto":
        return ONE, None
    engine = "ddp" if engine_setting == "auto" else engine_setting
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_setting in ("auto", "cuda") or device_setting.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if cuda else None)
        else:  # one process that names an engine: a world of one on a loopback rendezvous
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
        _OWNED[0] = True
    place = Dist(dist.get_rank(), dist.get_world_size(), local_rank, engine)
    if not place.main:  # one writer: other ranks log warnings only, with their rank
        logger = logging.getLogger("dpokit")
        logger.setLevel(logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {place.rank}] %(levelname)s %(message)s"))
        handler._dpokit = "console"  # type: ignore[attr-defined]
        logger.handlers = [handler]
        logger.propagate = False
    log.info("distributed: rank %d of %d, engine %s, device %s", place.rank, place.world, engine, device)
    return place, device


def teardown_group() -> None:
    """Leave the process group if dpokit made it (the CLI does at exit; a caller's own group is left alone)."""
    if _OWNED[0] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED[0] = False


# ---------------------------------------------------------------------------------- collectives
def all_reduce(t: torch.Tensor, place: Dist, op: Any = None) -> torch.Tensor:
    """Sum (or ``op``) over ranks, in place; the tensor itself in one process."""
    if place.active:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, place: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not place.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Any, place: Dist) -> Any:
    """``fn()`` on rank 0 alone; every rank gets its result, or raises the exception it raised."""
    result, error = None, None
    if place.main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised there
            error = e
    result, error = broadcast_object((result, error), place)
    if error is not None:
        raise error
    return result


def barrier(place: Dist) -> None:
    if place.active:
        dist.barrier()


# --------------------------------------------------------------------------------------- engines
def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM (FSDP2 groups): the modules whose class the model names in
    ``_no_split_modules``, else the decoder's ``layers``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        blocks = list(getattr(model.get_decoder(), "layers", []))
    if not blocks:
        raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__} to shard with FSDP2")
    return blocks


def shard(module: torch.nn.Module, model: Any, bf16_params: bool) -> torch.nn.Module:
    """FSDP2: one group per decoder layer of ``model`` (inside ``module``), the root on ``module``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def wrap(module: torch.nn.Module, place: Dist, bf16_params: bool = False) -> torch.nn.Module:
    """The policy's LogProbs module in the engine: the one thing every forward goes through."""
    if place.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [place.local_rank] if next(module.parameters()).is_cuda else None
        # buffers (rotary frequencies) are constants: no broadcast before every forward
        return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False,
                                       gradient_as_bucket_view=True)  # gradients live in the buckets: one copy
    if place.engine == "fsdp":
        return shard(module, module.model, bf16_params)
    return module


def reshard(module: torch.nn.Module, place: Dist) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward without a backward (filling the reference cache,
    evaluation): shard them again, so that the module's parameters are its shards (what the optimizer must see)."""
    if place.engine == "fsdp":
        module.reshard()


def squared_norm(t: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """sum(t^2) as a float64 scalar, accurate to about 1e-7 whatever t's size: fp32 norms of ``block``-element rows,
    combined in float64, without a float64 copy of t. (One fp32 norm over a 1.5M-element CPU tensor is off by
    ~1e-5 relative; that error moved with the sharding, which is what broke world-N = world-1.)"""
    flat = t.detach().reshape(-1)
    whole = flat.numel() - flat.numel() % block
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    if whole:
        total = total + torch.linalg.vector_norm(flat[:whole].view(-1, block), dim=1).double().square().sum()
    if whole < flat.numel():
        total = total + torch.linalg.vector_norm(flat[whole:]).double().square()
    return total


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, place: Dist) -> torch.Tensor:
    """Clip the gradients to a global L2 norm of ``max_norm`` (``inf``: measure only); returns the norm before
    clipping (float64). The norm is accurate (``squared_norm``) and the same however the gradients are split: under
    FSDP2 each rank sums its shards' squares and the sums are added over ranks. The clipping itself is torch's:
    every gradient times min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() for g in grads] if place.engine == "fsdp" else grads
    squares = torch.stack([squared_norm(g) for g in local]) if local else torch.zeros(1, dtype=torch.float64)
    total = squares.sum()
    if place.engine == "fsdp":
        all_reduce(total, place)
    total = total.sqrt()
    coef = torch.clamp(max_norm / (total.float() + 1e-6), max=1.0)
    if local:
        torch._foreach_mul_(local, coef.to(local[0].device))  # in place, on each rank's gradients (or shards)
    return total


def all_finite(params: list[torch.nn.Parameter], place: Dist) -> bool:
    """Whether every weight is finite, on every rank (each checks the shards it holds). One pass per tensor: a
    finite sum proves every element finite (a NaN or inf element makes the sum NaN or inf); only a tensor whose
    sum is not finite (NaN/inf inside, or finite values whose sum overflows) is checked element by element."""
    bad = torch.zeros((), dtype=torch.float64)
    local = [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in params]
    if local:
        sums = torch.stack([t.sum(dtype=torch.float32) for t in local])
        for k in torch.nonzero(~torch.isfinite(sums)).flatten().tolist():
            if not torch.isfinite(local[k]).all():
                bad += 1
                break
    return not bool(all_reduce(bad.to(params[0].device) if params else bad, place))


def no_sync(module: torch.nn.Module, place: Dist, last: bool) -> Any:
    """Gradient accumulation: skip the gradient reduction on every micro-batch but the step's last."""
    import contextlib

    if place.engine == "ddp" and not last:
        return module.no_sync()
    if place.engine == "fsdp":
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()
