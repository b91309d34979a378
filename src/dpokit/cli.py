"""Command line: ``dpokit sft | dpo | rm | online | rl | eval | score | frontier | pairs | generate | merge | data
check | losses | demo``.

Thin by design: parse, build the config, call one function (``COMMANDS``). Every config key is a flag
(``--train.lr 1e-5``) and a ``key=value`` override (``train.lr=1e-5``); the common ones have
short names (``--model``, ``--data``, ``--output-dir``, ``--max-steps``, ``--loss``, ``--beta``).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import re
import sys
import time
from typing import Any

from dpokit import __version__
from dpokit.config import Config as _Config
from dpokit.config import ConfigError, all_keys, field_meta, get_key, load_config, parse_override, set_key

log = logging.getLogger("dpokit")
DEFAULTS = _Config()
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # disk full, read-only, denied
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")

SHORT = {
    "--model": "model.name_or_path",
    "--ref-model": "model.ref_name_or_path",
    "--data": "data.train_files",
    "--eval-data": "data.eval_files",
    "--output-dir": "output_dir",
    "--max-steps": "train.max_steps",
    "--epochs": "train.epochs",
    "--batch-size": "train.batch_size",
    "--lr": "train.lr",
    "--loss": "loss.name",
    "--beta": "loss.beta",
    "--precision": "precision",
    "--seed": "train.seed",
    "--save-steps": "train.save_steps",
    "--skip-bad-records": "data.skip_bad_records",
}


def _add_config_args(p: argparse.ArgumentParser, stage_defaults: dict[str, Any]) -> None:
    defaults = _Config()
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (flags and key=value win over it)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="resume from the newest complete checkpoint of --output-dir, or from CKPT; 'auto': the "
                   "newest if there is one, else start (for torchrun --max-restarts)")
    g.add_argument("--extend", action="store_true",
                   help="with --resume: continue a run to a new length (train.max_steps/epochs), the learning-rate "
                   "schedule rebuilt for it")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the previous run in --output-dir (only what a dpokit run writes there is removed)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. train.lr=1e-5")
    short_for = {v: k for k, v in SHORT.items()}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key in all_keys():
        section = key.split(".")[0] if "." in key else "general"
        grp = groups.setdefault(section, p.add_argument_group(f"{section} options"))
        meta = field_meta(key)
        default = stage_defaults.get(key, get_key(defaults, key))
        names = [f"--{key}"] + ([short_for[key]] if short_for.get(key, f"--{key}") != f"--{key}" else [])
        text = f"{meta.get('help', '')} (default: {default!r})".replace("%", "%%")  # argparse %-formats help
        # keys the stage refuses still parse (so the refusal names them) but are not listed
        hidden = key in stage_defaults.get("_refused", ()) or key.split(".")[0] in stage_defaults.get("_refused", ())
        is_list = isinstance(get_key(defaults, key), list)
        is_bool = isinstance(get_key(defaults, key), bool)
        choices = meta.get("choices")
        grp.add_argument(  # a bool flag alone means true: --skip-bad-records
            *names, dest=key, default=argparse.SUPPRESS, nargs="+" if is_list else ("?" if is_bool else None),
            const="true" if is_bool else None,
            metavar="V" if not choices else "{" + ",".join(choices) + "}",
            help=argparse.SUPPRESS if hidden else text,
        )


def _config_from(args: argparse.Namespace, stage_defaults: dict[str, Any]) -> _Config:
    """defaults < stage defaults < YAML (--config) < flags < key=value overrides; validated for the command."""
    base = _Config()
    for key, value in stage_defaults.items():
        if not key.startswith("_"):
            set_key(base, key, value)
    ns = vars(args)
    overrides = [(key, ns[key]) for key in all_keys() if key in ns]
    overrides += [parse_override(text) for text in args.overrides]
    return load_config(args.config, overrides, base=base, stage=args.command)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpokit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"dpokit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sft = sub.add_parser("sft", help="supervised fine-tuning on demonstrations (makes a reference)",
                         allow_abbrev=False)
    _add_config_args(sft, STAGE_DEFAULTS["sft"])
    dpo = sub.add_parser("dpo", help="train with DPO (or another preference loss) against a frozen reference",
                         allow_abbrev=False)
    _add_config_args(dpo, STAGE_DEFAULTS["dpo"])
    rm = sub.add_parser("rm", help="train a Bradley-Terry reward model on preference pairs", allow_abbrev=False)
    _add_config_args(rm, STAGE_DEFAULTS["rm"])

    from dpokit import cli_onpolicy as onpolicy

    online = sub.add_parser("online", help="online/iterative DPO: rounds of sample, judge, pair, DPO, evaluate",
                            allow_abbrev=False)
    _add_config_args(online, STAGE_DEFAULTS["online"])
    onpolicy.add_online_args(online)
    rl = sub.add_parser("rl", help="RLOO: REINFORCE with a leave-one-out baseline, maximizing E[r] - beta KL",
                        allow_abbrev=False)
    _add_config_args(rl, STAGE_DEFAULTS["rl"])
    onpolicy.add_rl_args(rl)

    demo = sub.add_parser("demo", help="controlled-sentiment DPO on the embedded SmolLM2-135M-Instruct",
                          allow_abbrev=False)
    demo.add_argument("--output-dir", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--cache-dir", default=None,
                      help="cache for the converted model and sampled pairs (default: ~/.cache/dpokit)")
    demo.add_argument("--quick", action="store_true", help="a smaller run (a few minutes) to check the set-up")
    demo.add_argument("--seed", type=int, default=0, help="seed for sampling and training (default: 0)")

    gen = sub.add_parser("generate", help="sample completions from a model", allow_abbrev=False)
    gen.add_argument("--model", required=True, help="model directory, hub id, .gguf file or 'smollm2'")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line, or JSONL with 'prompt'")
    _add_sampling_args(gen, num_samples=1)
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                     "whose probability reaches this (default: 1.0, off)")

    sub.add_parser("losses", help="list the preference losses with their papers and options")

    merge = sub.add_parser("merge", help="merge a LoRA run's adapters into a full model", allow_abbrev=False)
    merge.add_argument("--model", required=True, help="a LoRA run's final/ (adapter + tokenizer)")
    merge.add_argument("--out", required=True, help="directory for the merged full model")

    ev = sub.add_parser("eval", help="did alignment work? reward accuracy/margins, win rate, KL", allow_abbrev=False)
    ev.add_argument("--model", required=True, help="the trained policy")
    ev.add_argument("--ref-model", help="the reference (for implicit rewards, win rate and KL)")
    ev.add_argument("--data", nargs="+", default=[], help="preference files: reward accuracy and margins")
    ev.add_argument("--beta", type=float, default=DEFAULTS.loss.beta,
                    help=f"beta of the implicit reward (default: {DEFAULTS.loss.beta})")
    ev.add_argument("--prompts", help="prompts (text lines or JSONL with 'prompt'): sample, judge, KL")
    _add_judge_args(ev)
    _add_sampling_args(ev, num_samples=4)
    ev.add_argument("--out", default=None, help="directory for eval_report.json, per_example.jsonl, samples.jsonl")

    from dpokit.eval.frontier import add_frontier_arguments
    from dpokit.eval.implicit import add_score_arguments

    add_score_arguments(sub.add_parser("score", help="score (prompt, completion) records with a DPO model's implicit "
                                       "reward beta*log(pi/pi_ref)", allow_abbrev=False))
    frontier = sub.add_parser("frontier", help="reward and KL at every snapshot of runs (a reward-KL frontier)",
                              allow_abbrev=False)
    add_frontier_arguments(frontier)
    _add_judge_args(frontier)

    pairs = sub.add_parser("pairs", help="on-policy preference pairs: sample n per prompt, rank with a judge",
                           allow_abbrev=False)
    pairs.add_argument("--model", required=True, help="model to sample from (usually the reference/SFT model)")
    pairs.add_argument("--prompts", required=True, help="prompts (text lines or JSONL with 'prompt')")
    _add_judge_args(pairs)
    onpolicy.add_pairing_args(pairs)
    _add_sampling_args(pairs, num_samples=8, short_n=True)
    pairs.add_argument("--out", required=True, help="output .jsonl")

    rep = sub.add_parser("report", help="rebuild a run's report.html, or compare several runs", allow_abbrev=False)
    rep.add_argument("runs", nargs="+", metavar="RUN", help="run directories (several: compared on shared axes)")
    rep.add_argument("--out", help="output HTML (default: RUN/report.html; several runs: compare.html)")

    data = sub.add_parser("data", help="data tools", allow_abbrev=False)
    dsub = data.add_subparsers(dest="data_command", required=True)
    check = dsub.add_parser("check", help="the data doctor: validate every record and summarize what is wrong",
                            allow_abbrev=False)
    check.add_argument("files", nargs="+", help="data files, save_to_disk folders or hub ids")
    check.add_argument("--model", help="tokenizer to measure token lengths and truncation with")
    check.add_argument("--max-length", type=int, default=DEFAULTS.data.max_length,
                       help=f"(default: {DEFAULTS.data.max_length}, as training)")
    check.add_argument("--max-prompt-length", type=int, default=None,
                       help="(default: half of --max-length, as training)")
    check.add_argument("--split", default="train", help="(default: train)")
    check.add_argument("--write-clean", metavar="OUT.jsonl", help="write the usable records here (inputs untouched)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--max-field-chars", type=int, default=1_000_000,
                       help="characters of text one field may hold; longer records are errors (default: 1000000)")
    return p


def _add_sampling_args(p: argparse.ArgumentParser, num_samples: int, short_n: bool = False) -> None:
    """The same sampling options, with the same defaults, for generate, eval and pairs: temperature 1 draws from
    the model's own distribution (what eval's KL estimate and on-policy pairs need, so generate shows the same
    samples), and the chat template is used exactly when the tokenizer has one."""
    g = p.add_argument_group("sampling")
    g.add_argument(*(["-n"] if short_n else []), "--num-samples", type=int, default=num_samples,
                   help=f"samples per prompt (default: {num_samples})")
    g.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="1 samples from the model itself, 0 is greedy (default: 1.0)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap each prompt as a user message in the chat template (default: when the tokenizer "
                   "has a chat template)")
    g.add_argument("--seed", type=int, default=0, help="(default: 0)")


def _check_sampling(args: argparse.Namespace) -> None:
    for name, low in (("num_samples", 1), ("max_new_tokens", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if not 0 < getattr(args, "top_p", 1.0) <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")


def _chat_prompts(prompts: list[str], args: argparse.Namespace, tokenizer: Any) -> list[Any]:
    """Prompts as user messages when --chat (default: when the tokenizer has a chat template), else plain text."""
    chat = args.chat if args.chat is not None else bool(getattr(tokenizer, "chat_template", None))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--chat: the tokenizer of {args.model} has no chat template; use --no-chat")
    log.info("prompts %s", "wrapped as user messages in the chat template" if chat else "used as plain text")
    args.chat = chat  # resolved: judges that tokenize (implicit, reward model) read the samples the same way
    return [[{"role": "user", "content": p}] for p in prompts] if chat else list(prompts)


def _judge_reads_chat(judge: Any, chat: bool) -> None:
    """A judge that tokenizes prompt and completion itself reads them as the samples were drawn (--chat or not)."""
    if judge is not None and hasattr(judge, "chat"):
        judge.chat = chat


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (one of)")
    g.add_argument("--judge", metavar="MODULE:FUNCTION",
                   help="reward function f(prompt, completion) -> float; or implicit:RUN, a DPO run's implicit reward")
    g.add_argument("--judge-rm", metavar="PATH", help="Hugging Face sequence-classification reward model")
    g.add_argument("--judge-openai", metavar="BASE_URL",
                   help="OpenAI-compatible endpoint (pairwise, both orders; key from $OPENAI_API_KEY)")
    g.add_argument("--judge-model", default="gpt-4o-mini", help="model name for --judge-openai")
    g.add_argument("--judge-timeout", type=float, default=30.0, help="seconds for one whole request (default: 30)")
    g.add_argument("--judge-max-invalid", type=float, default=0.1,
                   help="fraction of pairwise judgements that may fail before eval stops with an error (default: 0.1)")


def _judges(args: argparse.Namespace) -> tuple[Any, Any]:
    from dpokit.eval.judges import FunctionJudge, OpenAIJudge, RewardModelJudge

    chosen = [x for x in (args.judge, args.judge_rm, args.judge_openai) if x]
    if len(chosen) > 1:
        raise ConfigError("give one judge: --judge, --judge-rm or --judge-openai")
    if args.judge and args.judge.startswith("implicit:"):
        from dpokit.eval.implicit import ImplicitRewardJudge

        return ImplicitRewardJudge.load(args.judge, chat=getattr(args, "chat", False)), None
    if args.judge:
        return FunctionJudge.load(args.judge), None
    if args.judge_rm:
        return RewardModelJudge(args.judge_rm, chat=getattr(args, "chat", False)), None
    if args.judge_openai:
        if not (0 <= args.judge_max_invalid <= 1 and args.judge_timeout > 0):
            raise ConfigError("--judge-max-invalid must be in [0, 1] and --judge-timeout > 0")
        return None, OpenAIJudge(args.judge_openai, args.judge_model, timeout=args.judge_timeout)
    return None, None


STAGE_DEFAULTS: dict[str, dict[str, Any]] = {  # "_refused": keys (or sections) the stage refuses: not in --help
    "sft": {"output_dir": "runs/sft", "_refused": ("loss", "model.ref_name_or_path", "train.ref_cache")},
    "dpo": {"output_dir": "runs/dpo"},
    "online": {"output_dir": "runs/online", "_refused": ("data.train_files", "data.eval_files", "data.split",
                                                        "data.eval_split", "train.distributed")},
    "rl": {"output_dir": "runs/rl", "train.ref_cache": False,
           "_refused": ("data.train_files", "data.eval_files", "data.split", "data.eval_split", "train.ref_cache")},
    "rm": {"output_dir": "runs/rm"},
}


def _suggest_flag(arg: str, parser: argparse.ArgumentParser) -> str:
    from dpokit.trl_names import trl_hint

    hint = trl_hint(arg, flag=True)
    if hint:
        return f"unknown option '{arg}'; {hint}"
    flags = [s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
    close = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.5)
    return f"unknown option '{arg}'" + (f"; did you mean '{close[0]}'?" if close else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # key=value overrides may appear anywhere, even after a flag that takes a list (--data a b)
    kv = [a for a in argv if OVERRIDE.match(a)]
    args, unknown = parser.parse_known_args([a for a in argv if not OVERRIDE.match(a)])
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + kv
    if args.command == "demo":  # a first line before PyTorch loads (seconds on a busy machine)
        print(f"{time.strftime('%H:%M:%S')} INFO dpokit demo: loading PyTorch and transformers", file=sys.stderr,
              flush=True)
    from dpokit.progress import quiet_third_party
    from dpokit.train.loop import NonFiniteError, TrainingInterrupted
    from dpokit.train.rundir import setup_logging

    quiet_third_party()
    setup_logging()
    # under torchrun every rank meets the same mistakes: rank 0 alone says so
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    try:
        if unknown:
            sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
            raise ConfigError(_suggest_flag(unknown[0], sub))
        return _dispatch(args)
    except ConfigError as e:
        say(f"dpokit: config error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        import shlex

        run = e.checkpoint.parent.parent
        launcher = "torchrun ... -m dpokit" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "dpokit"
        say(f"dpokit: {e}.\nResume with: {launcher} {args.command} --config {shlex.quote(str(run / 'config.yaml'))} "
            "--resume", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteError as e:
        say(f"dpokit: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from dpokit.data.formats import DataError
        from dpokit.eval.judges import JudgeError
        from dpokit.models import ModelLoadError

        if isinstance(e, (DataError, ModelLoadError, FileNotFoundError, JudgeError)):
            say(f"dpokit: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:  # the machine's, not a bug: say where and what
            say(f"dpokit: error: {e.filename or 'writing'}: {e.strerror}", file=sys.stderr)
            return 1
        raise
    finally:
        from dpokit import distributed

        distributed.teardown_group()


def _train(args: argparse.Namespace) -> int:
    cfg = _config_from(args, STAGE_DEFAULTS[args.command])
    if args.command == "sft":
        from dpokit.train.sft import run_sft as run
    elif args.command == "rm":
        from dpokit.train.rm import run_rm as run
    else:
        from dpokit.train.dpo import run_dpo as run
    out = run(cfg, resume=args.resume, overwrite=args.overwrite, extend=args.extend)
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dpokit.demo import run_demo

    run_demo(output_dir=args.output_dir, cache_dir=args.cache_dir, quick=args.quick, seed=args.seed)
    return 0


def _losses(args: argparse.Namespace) -> int:
    from dpokit.losses import LOSSES

    print(f"{'name':<10} {'reference':<9} {'log-probs':<9} {'data':<8} {'nll':<4} {'options (defaults)':<36} paper")
    for name, spec in sorted(LOSSES.items()):
        opts = ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "-"
        print(f"{name:<10} {'yes' if spec.needs_reference else 'no':<9} "
              f"{'mean' if spec.length_normalized else 'sum':<9} {'paired' if spec.paired else 'unpaired':<8} "
              f"{'yes' if spec.needs_nll else '-':<4} {opts:<36} {spec.paper}")
    print("\nfor every paired loss: loss.rpo_alpha (NLL on chosen), loss.reference_free, loss.length_normalized, "
          "mixtures (loss.name=a,b with loss.weights); ranked data: loss.ranked=all_pairs|plackett_luce")
    return 0


def _report(args: argparse.Namespace) -> int:
    from dpokit.report import report_command

    return report_command(args.runs, args.out)


def _online(args: argparse.Namespace) -> int:
    from dpokit.cli_onpolicy import online

    return online(args)


def _rl(args: argparse.Namespace) -> int:
    from dpokit.cli_onpolicy import rl

    return rl(args)


def _dispatch(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)


def _merge(args: argparse.Namespace) -> int:
    """Base weights + LoRA adapters -> one full model that loads without peft."""
    from pathlib import Path

    from dpokit.models import load_model, load_tokenizer

    src, out = Path(args.model), Path(args.out)
    if not (src / "adapter_config.json").is_file():
        raise ConfigError(f"{src}: no adapter_config.json; `dpokit merge` takes a LoRA run's final/ directory")
    if out.resolve() == src.resolve():
        raise ConfigError("--out must differ from --model (the adapter directory is read, never overwritten)")
    merged = load_model(str(src))  # the recorded base, loaded the way every command loads models, adapters merged
    merged.save_pretrained(out)
    load_tokenizer(str(src)).save_pretrained(out)
    readme = src / "README.md"
    if readme.is_file():
        (out / "README.md").write_text(readme.read_text() + "\nLoRA adapters merged with `dpokit merge`.\n")
    print(out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from dpokit.eval.evaluate import generation_eval, preference_eval, read_prompts
    from dpokit.models import freeze, load_model, load_tokenizer, pick_device, resolve_precision

    if not args.data and not args.prompts:
        raise ConfigError("nothing to evaluate: give --data (preference pairs) and/or --prompts (sampling)")
    if args.prompts and not args.ref_model:
        raise ConfigError("--prompts compares the policy with a reference: give --ref-model")
    if args.prompts:
        _check_sampling(args)
    texts = read_prompts(args.prompts) if args.prompts else []
    judge, pairwise = _judges(args)
    if args.prompts and judge is None and pairwise is None:
        raise ConfigError("--prompts needs a judge: --judge, --judge-rm or --judge-openai")
    device = pick_device()
    precision = resolve_precision("auto", device)
    tok = load_tokenizer(args.model)
    policy = freeze(load_model(args.model)).to(device)
    reference = freeze(load_model(args.ref_model)).to(device) if args.ref_model else None
    out = Path(args.out) if args.out else None
    report: dict[str, Any] = {"model": args.model, "reference": args.ref_model}
    if args.data:
        report["preferences"] = preference_eval(policy, tok, args.data, reference=reference, beta=args.beta,
                                                device=device, precision=precision, out=out)
    if args.prompts:
        prompts = _chat_prompts(texts, args, tok)
        _judge_reads_chat(judge, args.chat)
        report["generation"] = generation_eval(
            policy, reference, tok, prompts, judge=judge, pairwise=pairwise, n=args.num_samples,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, device=device,
            precision=precision, out=out, max_invalid=args.judge_max_invalid)
    text = json.dumps(report, indent=1)
    if out is not None:
        (out / "eval_report.json").write_text(text)
        if out.name == "eval" and (out.parent / "metrics.jsonl").is_file():  # RUN/eval: the run's report shows it
            from dpokit.report import write_report

            write_report(out.parent)
    print(text)
    return 0


def _pairs(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from dpokit.eval.evaluate import make_pairs, read_prompts
    from dpokit.models import load_model, load_tokenizer, pick_device, resolve_precision

    _check_sampling(args)
    if args.num_samples < 2:
        raise ConfigError(f"-n/--num-samples must be >= 2 to make a pair, got {args.num_samples}")
    out = Path(args.out)
    if not out.parent.is_dir() or out.is_dir():
        raise ConfigError(f"--out {out}: " + ("a directory; give a .jsonl file name" if out.is_dir() else
                                              f"its directory {out.parent} does not exist"))
    texts = read_prompts(args.prompts)
    judge, pairwise = _judges(args)
    if judge is None and pairwise is None:
        raise ConfigError("dpokit pairs needs a judge: --judge, --judge-rm or --judge-openai")
    from dpokit.cli_onpolicy import pairing_of

    mode, pairing = pairing_of(args, pairwise)
    device = pick_device()
    tok = load_tokenizer(args.model)
    model = load_model(args.model).to(device).eval()
    prompts = _chat_prompts(texts, args, tok)
    _judge_reads_chat(judge, args.chat)
    result = make_pairs(model, tok, prompts, judge, n=args.num_samples, mode=mode, pairing=pairing,
                        pairwise=pairwise, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=args.seed, device=device, precision=resolve_precision("auto", device),
                        max_invalid=args.judge_max_invalid,
                        log_path=out.with_name(out.name + ".judgements.jsonl") if pairwise is not None else None)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records))
    os.replace(tmp, out)
    why = ", ".join(f"{n} {k}" for k, n in sorted(result.dropped.items()))
    print(f"{len(result.records)} pairs from {len(prompts)} prompts written to {out} "
          f"({result.prompts_without_pair} prompts made no pair: all their samples tied or were left out"
          + (f"; candidate pairs left out: {why}" if why else "")
          + (f"; {result.comparisons} pairwise comparisons" if pairwise is not None else "") + ")")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    """Exit 0 when every record is usable, 1 when any is not."""
    import json

    from dpokit.data.check import check_files
    from dpokit.models import load_tokenizer

    if args.max_field_chars < 1:
        raise ConfigError(f"--max-field-chars must be >= 1, got {args.max_field_chars}")
    tok = load_tokenizer(args.model) if args.model else None
    prompt = args.max_prompt_length if args.max_prompt_length is not None else args.max_length // 2
    report = check_files(args.files, args.split, tok, args.max_length, prompt, args.write_clean,
                         max_chars=args.max_field_chars)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.render())
    return 0 if report.ok else 1


def _generate(args: argparse.Namespace) -> int:
    from dpokit.eval.evaluate import read_prompts
    from dpokit.eval.sampling import sample
    from dpokit.models import load_model, load_tokenizer, pick_device, resolve_precision

    _check_sampling(args)
    prompts: list[str] = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file, "--prompts-file")
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompts-file")
    device = pick_device()
    tok = load_tokenizer(args.model)
    model = load_model(args.model).to(device)
    inputs = _chat_prompts(prompts, args, tok)
    for s in sample(model, tok, inputs, n=args.num_samples, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=device,
                    precision=resolve_precision("auto", device)):
        print(f"### prompt {s.prompt_index}: {prompts[s.prompt_index]}\n{s.text}\n")
    return 0


def _score(args: argparse.Namespace) -> int:
    from dpokit.eval.implicit import score_command

    return score_command(args)


def _frontier(args: argparse.Namespace) -> int:
    from dpokit.eval.frontier import frontier_command

    return frontier_command(args, *_judges(args))


COMMANDS = {
    "sft": _train, "dpo": _train, "demo": _demo, "generate": _generate, "data": _data_check, "eval": _eval,
    "merge": _merge, "pairs": _pairs, "losses": _losses, "report": _report, "online": _online, "rl": _rl,
    "rm": _train, "score": _score, "frontier": _frontier,
}


if __name__ == "__main__":
    sys.exit(main())
