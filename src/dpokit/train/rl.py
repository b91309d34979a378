"""``dpokit rl``: RLOO, the on-policy RL baseline, through the one training loop.

RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs", Sec. 3.2; Kool et al. 2019): for each prompt x draw k completions y_1..y_k from the current
policy, score each with the judge, and use the sequence-level KL penalty in the reward,

    R_i = r(x, y_i) - beta * l_i,     l_i = log pi(y_i | x) - log pi_ref(y_i | x)   (no gradient through l_i),

with the leave-one-out baseline b_i = (sum_{j != i} R_j) / (k - 1). The loss of a micro-batch is

    L = -(1 / N) sum_i (R_i - b_i) log pi(y_i | x),

N the samples of the whole optimizer step. Its gradient is an unbiased estimate of the gradient of
E_{y ~ pi}[r] - beta KL(pi || pi_ref): grad E_pi[r - beta (log pi - log pi_ref)] = E_pi[(r - beta l) grad log pi]
(the extra term E_pi[grad log pi] is 0), and b_i does not depend on y_i. Its fixed point is the
KL-regularized optimum pi*_beta ∝ pi_ref exp(r / beta), the policy DPO at beta also targets.

The recipe's micro-batches are sampled from the current policy inside the loop: ``collate`` draws a seed from
the global torch RNG (saved in every checkpoint, so a resumed run samples what the uninterrupted run sampled),
samples k completions per prompt through the unwrapped model under no_grad (at temperature 1: the policy's own
distribution, which the estimator needs), and scores them with the judge; ``compute`` runs the reference and
the policy's forward through the (wrapped) LogProbs module. Under torchrun with DDP each rank samples its own
prompts; FSDP2 is refused (generation would need every rank's full parameters gathered in lockstep).

Items are prompts; ``train.batch_size`` counts prompts per optimizer step (k samples each).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.config import Config, ConfigError, LossConfig
from dpokit.data.collate import Sequences, layout
from dpokit.data.tokenize import truncate_prompt
from dpokit.eval.judges import RewardJudge
from dpokit.eval.sampling import prompt_ids, sample_ids
from dpokit.logprobs import unwrap
from dpokit.losses import resolve_loss
from dpokit.models import load_model, load_tokenizer
from dpokit.progress import silenced
from dpokit.reference import build_reference
from dpokit.train.build import frozen_module, policy_module
from dpokit.train.loop import Job, run_stage, step_order
from dpokit.train.recipes import Batch, Logs, Recipe, _sum
from dpokit.train.rundir import open_session, update_data_report

log = logging.getLogger("dpokit")

DEFAULT_LR = 1e-6
SETTINGS_FILE = "rl.json"


# ------------------------------------------------------------------------------------------- the estimator
def rloo_advantages(rewards: torch.Tensor, logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """Leave-one-out advantages [P, k] of rewards and log-ratios [P, k] (k >= 2 samples of each of P prompts):
    R = r - beta * l, A_i = R_i - (sum_{j != i} R_j) / (k - 1) = k / (k - 1) * (R_i - mean(R))."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt for its leave-one-out baseline")
    total = rewards - beta * logratio
    return total - (total.sum(-1, keepdim=True) - total) / (k - 1)


def rloo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, k: int,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample RLOO losses -A_i * log pi(y_i) [N], advantages A [N] and log-ratios l [N] (both detached).

    ``logps`` [N]: log pi(y_i | x) with gradient, the k samples of each prompt consecutive; ``ref_logps`` and
    ``rewards`` [N]. Summed and divided by the step's samples, its gradient is
    -(1/N) sum_i (r_i - beta l_i - b_i) grad log pi(y_i | x) (Ahmadian et al. 2024, Eq. 6 with the KL penalty
    in the reward).
    """
    logratio = (logps.detach() - ref_logps).float()
    adv = rloo_advantages(rewards.float().view(-1, k), logratio.view(-1, k), beta).reshape(-1)
    return -adv * logps, adv, logratio


# ---------------------------------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class Prompt:
    """A training prompt: its ids (as sampling encodes them) and the text a judge sees."""

    prompt_ids: list[int]
    text: str


@dataclass
class SampledBatch(Batch):
    """Rows: the k samples of each prompt, consecutive (prompt-major); ``rewards`` [N] from the judge."""

    rewards: torch.Tensor = None  # type: ignore[assignment]
    k: int = 0


class RLOORecipe(Recipe):
    """k samples per prompt from the current policy, scored by ``judge``; the RLOO loss against ``reference``."""

    name = "rl"
    throughput_name = "prompts_per_s"  # the loop counts items: prompts (k samples each)
    postfix = ("reward", "kl", "objective")
    keys = ("loss", "reward", "kl", "objective", "entropy", "completion_length")
    batch_type = SampledBatch

    def __init__(self, model: Any, tokenizer: Any, judge: RewardJudge, reference: Any, *, k: int, beta: float,
                 max_new_tokens: int, device: torch.device, precision: str, rank: int = 0, layout: str = "auto"):
        super().__init__(tokenizer.pad_token_id, layout)
        self.model, self.tokenizer, self.judge, self.reference = model, tokenizer, judge, reference
        self.k, self.beta, self.max_new_tokens = k, beta, max_new_tokens
        self.device, self.precision, self.rank = device, precision, rank
        self.samples_scored = 0  # the judge budget spent by this process

    def units(self, items: Sequence[Prompt]) -> int:
        return len(items) * self.k

    def collate(self, items: Sequence[Prompt], index: Sequence[int]) -> SampledBatch:
        """Sample k completions per prompt from the current policy and score them (the global torch RNG gives the
        sampling seed and is left as if one number had been drawn)."""
        seed = (int(torch.randint(0, 2**62, (1,))) + 1_000_003 * self.rank) % 2**62
        with torch.random.fork_rng(devices=[]), silenced():
            samples = sample_ids(self.model, self.tokenizer, [x.prompt_ids for x in items], n=self.k,
                                 max_new_tokens=self.max_new_tokens, temperature=1.0, seed=seed,
                                 batch_size=max(1, len(items) * self.k), device=self.device,
                                 precision=self.precision)
            rewards = self.judge.score([items[s.prompt_index].text for s in samples], [s.text for s in samples])
        self.samples_scored += len(samples)
        rows = [(s.prompt_ids, s.completion_ids) for s in samples]
        groups = [list(range(j * self.k, (j + 1) * self.k)) for j in range(len(items))]
        keys = [(i, j) for i in index for j in range(self.k)]
        laid = layout(Sequences(rows, groups), self.layout, self.pad_id)
        self.layouts_used[laid.name] += 1
        return SampledBatch(laid, list(index), keys, rewards=torch.tensor(rewards, dtype=torch.float32), k=self.k)

    def compute(self, policy: Any, batch: SampledBatch, denom: int) -> tuple[torch.Tensor, Logs]:
        ref = self.reference.logps(batch)  # first: no forward without gradients between forward and backward
        sums, lengths, stats = policy(batch.seqs, stats=True)
        losses, _, logratio = rloo_loss(sums, ref.float(), batch.rewards, batch.k, self.beta)
        n = losses.shape[0]
        r = batch.rewards.float()
        logs: Logs = {
            "loss": (_sum(losses), n), "reward": (_sum(r), n), "kl": (_sum(logratio), n),
            "objective": (_sum(r - self.beta * logratio), n),
            "entropy": (stats.detach().float()[:, 0].sum(), lengths.sum()),
            "completion_length": (lengths.sum().double(), n),
        }
        return losses.sum() / denom, logs


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RLSettings:
    """What ``dpokit rl`` adds to the training config; kept in RUN/rl.json, and a resume must match it."""

    prompts: str
    eval_prompts: str | None = None
    k: int = 4
    max_new_tokens: int = 64
    chat: bool | None = None
    judge: dict[str, Any] = field(default_factory=dict)  # how the judge was given (to rebuild it on resume)

    def check(self) -> None:
        if self.k < 2:
            raise ConfigError(f"-k must be >= 2 (RLOO's leave-one-out baseline needs two samples), got {self.k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def check_rl_config(cfg: Config) -> None:
    """What ``dpokit rl`` refuses: options it would ignore, a reference cache, FSDP2."""
    t, d = cfg.train, cfg.data
    default = LossConfig()
    for key in ("name", "weights", "label_smoothing", "gamma", "tau", "cpo_alpha", "dpop_lambda",
                "desirable_weight", "undesirable_weight", "rpo_alpha", "reference_free", "length_normalized",
                "ranked"):
        if getattr(cfg.loss, key) != getattr(default, key):
            raise ConfigError(f"loss.{key}={getattr(cfg.loss, key)!r} has no effect on `dpokit rl` (RLOO; its KL "
                              "strength is loss.beta)")
    if d.train_files or d.eval_files:
        raise ConfigError("data.train_files/data.eval_files have no effect on `dpokit rl`: give --prompts (and "
                          "--eval-prompts); the completions are sampled")
    if t.ref_cache:
        raise ConfigError("train.ref_cache: `dpokit rl` scores fresh samples every step; there is nothing to cache")
    if t.distributed == "fsdp":
        raise ConfigError("train.distributed=fsdp: `dpokit rl` samples from the policy inside training, and "
                          "generation needs the full parameters on every rank (FSDP2 shards them); use "
                          "train.distributed=ddp")


def load_prompts(path: str, tokenizer: Any, chat: bool, budget: int, side: str) -> tuple[list[Prompt], int]:
    """Prompts of a file (``evaluate.read_prompts``), encoded as sampling encodes them; a prompt longer than
    ``budget`` tokens is cut on ``side`` (counted, returned second)."""
    from dpokit.eval.evaluate import read_prompts

    out, cut = [], 0
    for text in read_prompts(path):
        ids = prompt_ids(tokenizer, [{"role": "user", "content": text}] if chat else text)
        if len(ids) > budget:
            ids, cut = truncate_prompt(ids, budget, side, tokenizer.bos_token_id), cut + 1
        out.append(Prompt(ids, text))
    return out, cut


def use_chat(tokenizer: Any, chat: bool | None, model: str) -> bool:
    """--chat / --no-chat, or (None) whether the tokenizer has a chat template."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has:
        raise ConfigError(f"--chat: the tokenizer of {model} has no chat template; use --no-chat")
    return has if chat is None else chat


def record_settings(run_dir: Path, settings: Any, resuming: bool, name: str) -> None:
    """RUN/<name>: the command's own settings; a resume whose settings differ is refused, naming what differs."""
    path = run_dir / name
    now = asdict(settings)
    if resuming and path.is_file():
        before = json.loads(path.read_text())
        diff = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                if before.get(k) != now.get(k)]
        if diff:
            raise ConfigError(f"--resume with other settings than the run was started with ({'; '.join(diff)}); "
                              "give the same options, or start a new run")
        return
    path.write_text(json.dumps(now, indent=1))


# ------------------------------------------------------------------------------------------------ the stage
def build_rl(cfg: Config, resume: str | None = None, overwrite: bool = False, extend: bool = False, *,
             settings: RLSettings,
             judge: RewardJudge, model: Any = None, tokenizer: Any = None) -> Job:
    """Everything an RLOO run needs, ready for ``dpokit.train.loop.fit``."""
    settings.check()
    check_rl_config(cfg)
    cfg = copy.deepcopy(cfg)
    cfg.train.ref_cache = False  # fresh samples every step: the reference runs on them
    session = open_session(cfg, resume, "rl", overwrite, extend)
    place, t = session.dist, cfg.train
    if place.main:
        record_settings(session.run_dir, settings, session.resume_from is not None, SETTINGS_FILE)
    tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    chat = use_chat(tokenizer, settings.chat, cfg.model.name_or_path)
    budget, side = cfg.prompt_budget, cfg.data.prompt_truncation
    items, cut = load_prompts(settings.prompts, tokenizer, chat, budget, side)
    eval_items, eval_cut = load_prompts(settings.eval_prompts, tokenizer, chat, budget, side) \
        if settings.eval_prompts else ([], 0)
    if place.main:
        update_data_report(session.run_dir, "prompts", {"train": len(items), "eval": len(eval_items),
                                                         "truncated": {"train": cut, "eval": eval_cut},
                                                         "max_prompt_tokens": budget, "chat": chat})
    if cut or eval_cut:
        log.warning("%d training and %d held-out prompts are longer than %d tokens: cut on the %s", cut, eval_cut,
                    budget, side)
    model = model if model is not None else load_model(cfg.model.name_or_path, cfg.model.trust_remote_code)
    model.to(session.device)
    loss = resolve_loss(cfg.loss)
    # the reference: a frozen copy of the start (taken before wrapping), model.ref_name_or_path, or adapters off
    copied = frozen_module(cfg, copy.deepcopy(model), place) if not (cfg.model.ref_name_or_path or
                                                                     cfg.model.lora_r) else None
    policy = policy_module(cfg, model, place)
    refs = build_reference(cfg, loss, policy=policy, model=unwrap(policy), fingerprint=lambda: "",
                           frozen=lambda m: frozen_module(cfg, m, place), copied=copied,
                           splits={"train": lambda: None}, device=session.device, precision=session.precision,
                           place=place)
    log.info("reference: %s", refs["train"].kind)
    make = functools.partial(RLOORecipe, unwrap(policy), tokenizer, judge, refs["train"], k=settings.k,
                             beta=cfg.loss.beta, max_new_tokens=settings.max_new_tokens, device=session.device,
                             precision=session.precision, rank=place.rank, layout=t.layout)
    return Job(session=session, policy=policy, recipe=make(), items=items,
               order=step_order(cfg, len(items), place), lr=t.lr if t.lr is not None else DEFAULT_LR,
               tokenizer=tokenizer, eval_recipe=make() if eval_items else None, eval_items=eval_items)


def run_rl(cfg: Config, settings: RLSettings, judge: RewardJudge, resume: str | None = None,
           overwrite: bool = False) -> Path:
    """Train with RLOO; returns the ``final/`` directory."""
    return run_stage(functools.partial(build_rl, settings=settings, judge=judge), cfg, resume, overwrite)
