"""``dpokit online`` and ``dpokit rl`` on the command line: their own options (beside the config keys), the
settings a resume keeps (each flag given, else the run's stored value, else the default), and the two commands."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dpokit.cli import STAGE_DEFAULTS, _add_judge_args, _config_from, _judges
from dpokit.config import ConfigError, all_keys

ONLINE_FLAGS = {"prompts": "prompts", "eval_prompts": "eval_prompts", "rounds": "rounds",
                "prompts_per_round": "prompts_per_round", "num_samples": "n", "mode": "mode",
                "pairs_per_prompt": "pairs_per_prompt", "rso_beta": "rso_beta", "rso_samples": "rso_samples",
                "bt_tau": "bt_tau", "reference": "reference", "start": "start", "max_new_tokens": "max_new_tokens",
                "temperature": "temperature", "eval_samples": "eval_samples", "chat": "chat"}
RL_FLAGS = {"prompts": "prompts", "eval_prompts": "eval_prompts", "samples_per_prompt": "k",
            "max_new_tokens": "max_new_tokens", "chat": "chat"}
PAIRING_DEFAULTS = {"pairs_per_prompt": 1, "rso_beta": 0.5, "rso_samples": 2, "bt_tau": 1.0}
JUDGE_FLAGS = ("judge", "judge_rm", "judge_openai", "judge_model", "judge_timeout", "judge_max_invalid")
JUDGE_DEFAULTS = {"judge_model": "gpt-4o-mini", "judge_timeout": 30.0, "judge_max_invalid": 0.1}


def add_pairing_args(p: argparse.ArgumentParser) -> None:
    """How a prompt's scored samples make pairs (``dpokit.eval.pairing``), for pairs and online."""
    g = p.add_argument_group("pairing")
    g.add_argument("--mode", choices=["best-worst", "all-pairs", "random", "rso", "bt"], default=None,
                   help="best-worst: k-th best vs k-th worst; all-pairs: every pair with different rewards; random: "
                   "samples paired as drawn, labelled by reward; rso: statistical rejection sampling (Liu et al. "
                   "2023) of --rso-samples from the candidates, paired as accepted; bt: random pairs, the winner "
                   "drawn with probability sigmoid((r_a - r_b) / --bt-tau) (default: best-worst; with "
                   "--judge-openai: random)")
    g.add_argument("--pairs-per-prompt", type=int, default=None,
                   help="best-worst: k-th best vs k-th worst, k <= this (default: 1)")
    g.add_argument("--rso-beta", type=float, default=None,
                   help="rso: acceptance exp((r - r_max) / beta), the tilt toward high reward (default: 0.5)")
    g.add_argument("--rso-samples", type=int, default=None,
                   help="rso: samples accepted per prompt, paired as accepted (default: 2, one pair)")
    g.add_argument("--bt-tau", type=float, default=None, help="bt: Bradley-Terry temperature (default: 1.0)")


def pairing_of(args: argparse.Namespace, pairwise: Any) -> tuple[str, Any]:
    """The mode and the pairing object of the pairing flags; a mode a pairwise judge cannot label is refused."""
    from dpokit.eval.pairing import check_pairwise_mode, make_pairing

    for name, default in PAIRING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.pairs_per_prompt < 1:
        raise ConfigError(f"--pairs-per-prompt must be >= 1, got {args.pairs_per_prompt}")
    if pairwise is not None:
        try:
            return check_pairwise_mode(args.mode or "random", args.num_samples), None
        except ValueError as e:
            raise ConfigError(str(e)) from None
    mode = args.mode or "best-worst"
    if mode == "rso" and not 2 <= args.rso_samples <= args.num_samples:
        raise ConfigError(f"--rso-samples must be in [2, -n {args.num_samples}], got {args.rso_samples}")
    try:
        return mode, make_pairing(mode, pairs_per_prompt=args.pairs_per_prompt, rso_beta=args.rso_beta,
                                  rso_samples=args.rso_samples, bt_tau=args.bt_tau)
    except ValueError as e:
        raise ConfigError(f"--mode {mode}: {e}") from None


def _add_onpolicy_sampling(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--prompts", help="training prompts (text lines or JSONL with 'prompt')")
    g.add_argument("--eval-prompts", help="held-out prompts, sampled and judged to evaluate the policy")
    g.add_argument("--max-new-tokens", type=int, default=None, help="(default: 64)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap each prompt as a user message in the chat template (default: when the tokenizer "
                   "has a chat template)")


def add_online_args(p: argparse.ArgumentParser) -> None:
    """Options of ``dpokit online`` (each round's DPO takes the config keys); None: not given (a resume takes the
    run's own)."""
    g = p.add_argument_group("online rounds")
    _add_onpolicy_sampling(g)
    g.add_argument("--rounds", type=int, default=None, help="rounds of sample-judge-pair-train (default: 3)")
    g.add_argument("--prompts-per-round", type=int, default=None,
                   help="prompts sampled each round; with train.batch_size of them and one epoch a round is one "
                   "DPO step: per-step online DPO (default: 64)")
    g.add_argument("-n", "--num-samples", type=int, default=None, help="samples per prompt (default: 4)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: 1.0)")
    g.add_argument("--reference", choices=["initial", "previous"], default=None,
                   help="each round's DPO reference: the initial model, or the policy after the previous round "
                   "(default: initial)")
    g.add_argument("--start", choices=["initial", "previous"], default=None,
                   help="where each round's policy starts (and samples from): the previous round's policy or the "
                   "initial model (default: previous)")
    g.add_argument("--eval-samples", type=int, default=None, help="samples per held-out prompt (default: 4)")
    g.add_argument("--eval-judge", metavar="MODULE:FUNCTION",
                   help="reward function for the held-out evaluation (default: the training judge)")
    add_pairing_args(p)
    _add_judge_args(p)


def add_rl_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RLOO")
    _add_onpolicy_sampling(g)
    g.add_argument("-k", "--samples-per-prompt", type=int, default=None,
                   help="samples per prompt each step, for the leave-one-out baseline (default: 4)")
    _add_judge_args(p)


def _given_settings(args: argparse.Namespace, flags: dict[str, str], stored: dict[str, Any] | None,
                    defaults: dict[str, Any]) -> dict[str, Any]:
    """A command's own settings: each flag given, else the stored run's (a resume), else its default; a resume
    given a value other than the run's is refused, naming it."""
    out = {}
    for flag, name in flags.items():
        value = getattr(args, flag, None)
        if value is not None and stored is not None and stored.get(name) != value:
            raise ConfigError(f"--{flag.replace('_', '-')} {value!r}: the run in {args.output_dir_resolved} was "
                              f"started with {stored.get(name)!r}; a resume keeps the run's settings")
        out[name] = value if value is not None else stored.get(name) if stored is not None else defaults.get(name)
    return out


def _judge_flags(args: argparse.Namespace, stored: dict[str, Any] | None) -> dict[str, Any]:
    given = {k: getattr(args, k) for k in JUDGE_FLAGS if getattr(args, k) not in (None, JUDGE_DEFAULTS.get(k))}
    if stored is not None and given and any(stored.get(k) != v for k, v in given.items()):
        raise ConfigError(f"the judge options differ from the run's ({stored}); a resume keeps the run's judge")
    base = stored if stored is not None and not given else {k: getattr(args, k) for k in JUDGE_FLAGS}
    return {k: base.get(k, JUDGE_DEFAULTS.get(k)) for k in JUDGE_FLAGS}


def _stored_settings(output_dir: str, name: str, resume: Any) -> dict[str, Any] | None:
    import json
    from pathlib import Path

    path = Path(output_dir) / name
    if not resume or not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get("settings", data)


def online(args: argparse.Namespace) -> int:
    import argparse as ap
    import dataclasses
    from pathlib import Path

    from dpokit.eval.judges import FunctionJudge
    from dpokit.train.loop import TrainingInterrupted
    from dpokit.train.online import SETTINGS_FILE, OnlineSettings, run_online, stored_run

    cfg = _config_from(args, STAGE_DEFAULTS["online"])
    args.output_dir_resolved = cfg.output_dir
    stored = _stored_settings(cfg.output_dir, SETTINGS_FILE, args.resume)
    if stored is not None and not _config_given(args):
        cfg = stored_run(Path(cfg.output_dir))[1]  # a bare resume: the run's own config
    defaults = {f.name: f.default for f in dataclasses.fields(OnlineSettings) if f.default is not dataclasses.MISSING}
    values = _given_settings(args, ONLINE_FLAGS, stored, defaults)
    judge_flags = _judge_flags(args, stored.get("judge") if stored else None)
    eval_judge = args.eval_judge or (stored or {}).get("eval_judge", {}).get("judge")
    if values["prompts"] is None:
        raise ConfigError("dpokit online needs --prompts (training prompts)")
    judge, pairwise = _judges(ap.Namespace(**judge_flags))
    if judge is None and pairwise is None:
        raise ConfigError("dpokit online needs a judge: --judge, --judge-rm or --judge-openai")
    if values["mode"] is None:
        values["mode"] = "random" if pairwise is not None else "best-worst"
    settings = OnlineSettings(**values, judge=judge_flags, eval_judge={"judge": eval_judge} if eval_judge else {})
    try:
        result = run_online(cfg, settings, judge or pairwise,
                            FunctionJudge.load(eval_judge) if eval_judge else None, resume=bool(args.resume),
                            overwrite=args.overwrite)
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        import shlex

        print(f"dpokit: online run stopped ({type(e).__name__}); every complete round is kept. Resume with: dpokit "
              f"online --output-dir {shlex.quote(cfg.output_dir)} --resume", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    print(result.final)
    return 0


def _config_given(args: argparse.Namespace) -> bool:
    """Whether the command line sets any config key other than output_dir (a --config file, a flag, key=value)."""
    ns = vars(args)
    return bool(args.config or args.overrides or any(k in ns for k in all_keys() if k != "output_dir"))


def rl(args: argparse.Namespace) -> int:
    import argparse as ap
    import dataclasses

    from dpokit.train.rl import SETTINGS_FILE, RLSettings, run_rl

    cfg = _config_from(args, STAGE_DEFAULTS["rl"])
    args.output_dir_resolved = cfg.output_dir
    stored = _stored_settings(cfg.output_dir, SETTINGS_FILE, args.resume)
    defaults = {f.name: f.default for f in dataclasses.fields(RLSettings) if f.default is not dataclasses.MISSING}
    values = _given_settings(args, RL_FLAGS, stored, defaults)
    judge_flags = _judge_flags(args, stored.get("judge") if stored else None)
    if values["prompts"] is None:
        raise ConfigError("dpokit rl needs --prompts (training prompts)")
    judge, pairwise = _judges(ap.Namespace(**judge_flags))
    if pairwise is not None:
        raise ConfigError("dpokit rl needs a reward per sample: --judge or --judge-rm (a pairwise judge compares "
                          "two samples; use it with dpokit online)")
    if judge is None:
        raise ConfigError("dpokit rl needs a judge: --judge or --judge-rm")
    out = run_rl(cfg, RLSettings(**values, judge=judge_flags), judge, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0
