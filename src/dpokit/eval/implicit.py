"""The implicit reward of a DPO model, as a score for any (prompt, completion) and as a judge.

DPO's policy defines a reward (Rafailov et al. 2023, Eq. 5, up to a term that depends on the prompt only):

    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)),

with sequence log-probs summed over the completion's tokens, the completion tokenized jointly with its
prompt and EOS appended, as in training (the convention RewardBench uses for DPO models). The
reference-free option scores the per-token mean (1 / |y|) sum_t log pi(y_t | x, y_<t) (RewardBench's "avg").
Policy and reference go through the same ``LogProbs`` module on the same layout, so a policy equal to its
reference scores exactly 0.

``dpokit score --model RUN --data FILE`` scores a file; ``--judge implicit:RUN`` makes it the judge of
``dpokit pairs``, ``dpokit eval`` and Best-of-N. RUN is a dpokit run directory (its ``final/``), ``final/``
itself or a snapshot ``RUN/snapshots/step-N``; the reference and beta come from the run's ``config.yaml``
(``model.ref_name_or_path``, else the model it started from; ``loss.beta``) unless given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from dpokit.config import ConfigError
from dpokit.data.collate import Sequences, layout
from dpokit.data.formats import SFTExample, load_sft
from dpokit.data.tokenize import TokenizedSFT, TokenizeReport, tokenize_sft
from dpokit.logprobs import LogProbs
from dpokit.models import autocast

log = logging.getLogger("dpokit")


@dataclass(frozen=True)
class RunModel:
    """A model of a dpokit run: where its weights are, and its run's resolved config (None: not inside a run)."""

    model_dir: Path
    config: dict[str, Any] | None

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.config or {}
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return default if node is None else node


def resolve_run(path: str | Path) -> RunModel:
    """A run directory (-> its final/), final/ itself, a snapshot RUN/snapshots/step-N, or any model directory."""
    p = Path(path)
    if (p / "final" / "config.json").is_file():
        p = p / "final"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a dpokit run directory (with final/) nor a model directory "
                                "(with config.json)")
    run = p.parent.parent if p.parent.name == "snapshots" else p.parent
    cfg_path = run / "config.yaml"
    config = None
    if cfg_path.is_file():
        loaded = yaml.safe_load(cfg_path.read_text())
        config = loaded if isinstance(loaded, dict) else None
    return RunModel(p, config)


@dataclass(frozen=True)
class ImplicitScores:
    """Per example: ``reward`` [N]; ``policy`` summed log pi [N]; ``reference`` summed log pi_ref [N] (None when
    reference-free); ``lengths`` completion tokens [N] (EOS included)."""

    reward: list[float]
    policy: list[float]
    reference: list[float] | None
    lengths: list[int]


class ImplicitReward:
    """beta * (log pi - log pi_ref) of tokenized (prompt, completion) examples; per-token mean log pi when
    ``reference`` is None."""

    def __init__(self, policy: Any, reference: Any | None, tokenizer: Any, beta: float, *, batch_size: int = 16,
                 device: torch.device | None = None, precision: str = "fp32", max_length: int = 1024,
                 max_prompt_length: int = 512):
        self.policy, self.reference, self.tokenizer, self.beta = policy, reference, tokenizer, beta
        self.batch_size, self.precision = batch_size, precision
        self.device = device or next(policy.parameters()).device
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self._policy_lp = LogProbs(policy)
        self._reference_lp = LogProbs(reference) if reference is not None else None

    @property
    def reference_free(self) -> bool:
        return self.reference is None

    def tokenize(self, examples: Sequence[SFTExample], report: TokenizeReport | None = None) -> list[TokenizedSFT]:
        return [tokenize_sft(self.tokenizer, ex, max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                             report=report) for ex in examples]

    @torch.no_grad()
    def score_items(self, items: Sequence[TokenizedSFT]) -> ImplicitScores:
        """Examples in order, ``batch_size`` per forward; rows sharing a prompt form a group (shared-prompt layout
        where it computes fewer tokens)."""
        pol, ref, lengths = [], [], []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            rows = [(x.prompt_ids, x.completion_ids) for x in chunk]
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (p, _) in enumerate(rows):
                groups.setdefault(tuple(p), []).append(i)
            batch = layout(Sequences(rows, list(groups.values())), "auto", pad).to(self.device)
            with autocast(self.device, self.precision):
                sums, lens = self._policy_lp(batch)
                if self._reference_lp is not None:
                    ref += self._reference_lp(batch)[0].float().cpu().tolist()
            pol += sums.float().cpu().tolist()
            lengths += lens.cpu().tolist()
        if self.reference_free:
            reward = [s / max(n, 1) for s, n in zip(pol, lengths)]
            return ImplicitScores(reward, pol, None, lengths)
        reward = [self.beta * (a - b) for a, b in zip(pol, ref)]
        return ImplicitScores(reward, pol, ref, lengths)

    def score_examples(self, examples: Sequence[SFTExample]) -> ImplicitScores:
        return self.score_items(self.tokenize(examples))


def load_implicit(run: str | Path, *, ref_model: str | None = None, beta: float | None = None,
                  reference_free: bool = False, batch_size: int = 16, device: torch.device | None = None,
                  precision: str = "auto") -> ImplicitReward:
    """The implicit reward of a run's model: reference and beta from its config unless given."""
    from dpokit.models import freeze, load_model, load_tokenizer, pick_device, resolve_precision

    found = resolve_run(run)
    device = device or pick_device()
    if beta is None:
        beta = float(found.get("loss.beta", 0.0)) or None
        if beta is None and not reference_free:
            raise ConfigError(f"{run}: no loss.beta in a run config.yaml; give the beta of the implicit reward")
    if beta is not None and not beta > 0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    reference = None
    if not reference_free:
        ref_name = ref_model or found.get("model.ref_name_or_path") or found.get("model.name_or_path")
        trained_free = found.get("loss.reference_free", False) or str(found.get("loss.name", "")).split(",")[0] in (
            "simpo", "orpo", "cpo")
        if ref_model is None and (ref_name is None or trained_free):
            why = "its loss runs no reference" if trained_free else "its config.yaml names no model"
            raise ConfigError(f"{run}: no reference for the implicit reward ({why}); give one (--ref-model) or "
                              "score reference-free (--reference-free)")
        reference = freeze(load_model(str(ref_name))).to(device)
    tokenizer = load_tokenizer(str(found.model_dir))
    policy = freeze(load_model(str(found.model_dir))).to(device)
    max_length = int(found.get("data.max_length", 1024))
    prompt_budget = found.get("data.max_prompt_length") or max_length // 2
    return ImplicitReward(policy, reference, tokenizer, beta or 1.0, batch_size=batch_size, device=device,
                          precision=resolve_precision(precision, device), max_length=max_length,
                          max_prompt_length=int(prompt_budget))


@dataclass
class ImplicitRewardJudge:
    """A reward judge (``score(prompts, completions)``) from a run's implicit reward. With ``chat`` the prompt is a
    user turn and the completion the assistant's (as ``--chat`` samples were drawn), else plain text."""

    reward: ImplicitReward
    chat: bool = False
    name: str = "implicit"

    @classmethod
    def load(cls, spec: str, chat: bool = False, **kwargs: Any) -> ImplicitRewardJudge:
        """``implicit:RUN``."""
        return cls(load_implicit(spec.split(":", 1)[1], **kwargs), chat, spec)

    def examples(self, prompts: Sequence[str], completions: Sequence[str]) -> list[SFTExample]:
        if self.chat:
            return [SFTExample([{"role": "user", "content": p}], [{"role": "assistant", "content": c}])
                    for p, c in zip(prompts, completions)]
        return [SFTExample(p, c) for p, c in zip(prompts, completions)]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return self.reward.score_examples(self.examples(prompts, completions)).reward


# ----------------------------------------------------------------------------------------- dpokit score
def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a dpokit run directory, its final/, a snapshot, or a model")
    p.add_argument("--data", nargs="+", required=True,
                   help="(prompt, completion) records: {'prompt', 'completion'} (text or messages), {'messages'}, "
                        "or preference records (their chosen side)")
    p.add_argument("--ref-model", help="the reference (default: the run's model.ref_name_or_path, else its start)")
    p.add_argument("--beta", type=float, help="beta of the implicit reward (default: the run's loss.beta)")
    p.add_argument("--reference-free", action="store_true",
                   help="score the per-token mean log-prob of the model alone (no reference, no beta)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default: 16)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="(default: auto)")
    p.add_argument("--out", help="write one JSON line per record here (default: standard output)")


def score_command(args: argparse.Namespace) -> int:
    """``dpokit score``: one JSON line per record (its reward and the log-probs behind it), then a summary."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.reference_free and (args.ref_model or args.beta is not None):
        raise ConfigError("--reference-free scores the model alone: --ref-model and --beta do not apply")
    scorer = load_implicit(args.model, ref_model=args.ref_model, beta=args.beta, reference_free=args.reference_free,
                           batch_size=args.batch_size, precision=args.precision)
    examples = load_sft(list(args.data))
    report = TokenizeReport()
    items = scorer.tokenize(examples, report)
    scores = scorer.score_items(items)
    lines = []
    for i, (ex, r) in enumerate(zip(examples, scores.reward)):
        row: dict[str, Any] = {"index": i, "source": ex.source, "reward": r, "logp": scores.policy[i],
                               "tokens": scores.lengths[i]}
        if scores.reference is not None:
            row["ref_logp"] = scores.reference[i]
        lines.append(json.dumps(row) + "\n")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(out)
    else:
        sys.stdout.write("".join(lines))
    kind = "per-token mean log-prob (reference-free)" if scorer.reference_free else \
        f"beta * (log pi - log pi_ref), beta = {scorer.beta:g}"
    mean = sum(scores.reward) / len(scores.reward) if scores.reward else float("nan")
    print(f"{len(items)} records scored ({kind}); mean {mean:.4g}; tokenization: {report.summary()}"
          + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    return 0

