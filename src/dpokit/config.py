"""Typed run configuration: defaults < YAML file < command-line flags < ``key=value`` overrides.

Every field has a dotted key (``train.lr``, ``loss.beta``, ...). The same keys are used in YAML
files, in ``key=value`` overrides and in the resolved ``config.yaml`` written into each run
directory, so a run can be repeated with ``dpokit dpo --config RUN/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "save_config"]


FLOAT32_MAX = 3.4028234663852886e38  # every float setting enters fp32 arithmetic


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a config never needs them, and expanding nested aliases ('billion
    laughs') is how a small file becomes gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a dpokit config",
                                              event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to ``limit`` characters: an error message never carries a huge value."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxdict = 8
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= limit + 10 else text[:limit] + "...'"


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "smollm2",
        "policy to train: Hugging Face directory, hub id, a .gguf file, or 'smollm2' (the embedded "
        "SmolLM2-135M-Instruct)",
    )
    ref_name_or_path: str | None = _f(
        None, "frozen reference for DPO; default: a frozen copy of the starting policy"
    )
    trust_remote_code: bool = _f(False, "allow code shipped with a hub model to run (off by default)")
    device: str = _f("auto", "cpu, cuda, cuda:N, mps, or auto (cuda > mps > cpu)")
    lora_r: int = _f(0, "LoRA rank; 0 trains all weights. With LoRA the reference is the same weights with the "
                     "adapters switched off (no second copy)")
    lora_alpha: float = _f(16.0, "LoRA scaling alpha (with model.lora_r > 0)")
    lora_dropout: float = _f(0.0, "LoRA dropout (with model.lora_r > 0)")
    lora_target_modules: list[str] = _f(["all-linear"], "modules that get adapters (with model.lora_r > 0)")


@dataclass
class DataConfig:
    train_files: list[str] = _f([], "training data: .jsonl/.json/.parquet/.csv files, save_to_disk folders, hub ids")
    eval_files: list[str] = _f([], "held-out data, evaluated at the end of training")
    split: str = _f("train", "split of data.train_files to read from a hub id or a DatasetDict folder")
    eval_split: str | None = _f(None, "split of data.eval_files to read from a hub id or a DatasetDict folder; "
                                "default: test, then validation (the first the dataset has)")
    max_length: int = _f(1024, "maximum tokens of prompt + completion")
    max_prompt_length: int | None = _f(
        None, "prompt budget when prompt + completion exceed max_length (default: half of data.max_length)"
    )
    skip_bad_records: bool = _f(
        False, "skip unusable records (counted by kind in data_report.json) instead of stopping at the first"
    )
    prompt_truncation: str = _f(
        "left", "which end of an over-long prompt to cut: left or right", choices=["left", "right"]
    )
    max_field_chars: int = _f(1_000_000, "characters of text one field of a record may hold; a longer one is an "
                              "error (kind too_large), which bounds what one record costs to tokenize")


@dataclass
class TrainConfig:
    batch_size: int = _f(8, "pairs (or SFT examples) per optimizer step over all processes (the global batch)")
    grad_accum: int = _f(1, "micro-batches per optimizer step; must divide batch_size")
    lr: float | None = _f(None, "peak learning rate; default 1e-6 for dpo, 2e-5 for sft")
    max_steps: int | None = _f(None, "optimizer steps to run; exclusive with epochs")
    epochs: float | None = _f(None, "passes over the data (default 1); exclusive with max_steps")
    warmup_ratio: float = _f(0.1, "fraction of steps spent warming up the learning rate linearly from 0")
    scheduler: str = _f("linear", "learning-rate decay after warmup", choices=["linear", "cosine", "constant"])
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping")
    save_steps: int = _f(0, "write a resumable checkpoint every N steps (0: only at the end)")
    keep_last: int = _f(2, "checkpoints kept on disk (the newest)")
    snapshot_steps: int = _f(0, "every N steps write the model's weights alone to RUN/snapshots/step-N/ (a model "
                             "directory, never pruned): points along training for `dpokit frontier` (0: none)")
    log_steps: int = _f(1, "write a metrics.jsonl line every N steps (averaged over them)")
    seed: int = _f(42, "seed for data order, initialisation and sampling")
    max_nonfinite: int = _f(3, "updates with a NaN/inf loss or gradient skipped (and counted) before the run stops")
    logit_chunk_tokens: int = _f(1024, "completion tokens per LM-head chunk (bounds logit memory)")
    forward_tokens: int | None = _f(
        None, "positions one forward computes at most: a micro-batch over it runs as consecutive forwards of whole "
        "examples (the same gradient; one forward's activation memory; no padding between them); 0: never split; "
        "default: 512 on a CPU, no limit on an accelerator; never split for kto (its KL baseline is per micro-batch)")
    layout: str = _f(
        "auto", "how a micro-batch is laid out: padded rows, packed (padding-free rows), shared_prompt (one row "
        "[prompt | response | response...] per prompt), or auto: per micro-batch, the one computing the fewest "
        "tokens (all give the same numbers)", choices=["auto", "padded", "packed", "shared_prompt"])
    ref_cache: bool | None = _f(
        None, "compute reference log-probs once (over the first epoch's own micro-batches), cache them on disk by "
        "content hash, and free the reference model; default: on wherever a reference is needed and the cache is "
        "exact (not for kto, whose KL rows change with the batch)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory, ~30% slower)")
    compile: bool = _f(False, "torch.compile the decoder (first steps slower while it compiles)")
    distributed: str = _f(
        "auto", "parallel engine: ddp (DistributedDataParallel) or fsdp (FSDP2, sharded parameters, gradients and "
        "optimizer state); auto: ddp under torchrun, none in one process", choices=["auto", "ddp", "fsdp"])
    fsdp_bf16_params: bool = _f(False, "FSDP2 mixed precision: bf16 parameters in forward and backward, fp32 "
                                "gradient reduction and master weights (train.distributed=fsdp)")
    dist_timeout: float = _f(1800.0, "seconds a collective may wait for the other ranks before the run fails")
    final_dtype: str = _f("fp32", "dtype of the weights written to final/: fp32 (the trained weights as they are) "
                          "or bf16 (half the disk)", choices=["fp32", "bf16"])
    displacement_nats: float = _f(
        1.0, "warn when the chosen log-prob falls this far below the reference's while margins grow (0: off)"
    )
    report_to: list[str] = _f([], "also log metrics and config to these trackers, offline, under the run directory",
                              choices=["tensorboard", "wandb", "mlflow"])


@dataclass
class LossConfig:
    name: str = _f("sigmoid", "preference loss (see `dpokit losses`); several joined by ',' train a weighted mixture")
    weights: list[float] = _f([], "mixture weights, one per loss in loss.name (default: 1 each)")
    beta: float = _f(0.1, "KL strength beta of the implicit reward beta*log(pi/pi_ref) (ORPO: lambda)")
    label_smoothing: float | None = _f(None, "probability a label is flipped (sigmoid/cDPO, robust, exo_pair, aot, "
                                       "simpo, cpo); default: the loss's own")
    gamma: float | None = _f(None, "SimPO target margin gamma (default 0.5)")
    tau: float | None = _f(None, "DiscoPOP temperature tau (default 0.05)")
    cpo_alpha: float | None = _f(None, "CPO weight of the chosen NLL term (default 1.0)")
    dpop_lambda: float | None = _f(None, "DPO-Positive penalty lambda on a falling chosen likelihood (sigmoid)")
    desirable_weight: float | None = _f(None, "KTO weight of desirable examples (default 1.0)")
    undesirable_weight: float | None = _f(None, "KTO weight of undesirable examples (default 1.0)")
    rpo_alpha: float = _f(0.0, "weight of an added NLL term on the chosen response (RPO); 0 = off")
    reference_free: bool = _f(False, "treat pi_ref as uniform (log pi_ref = 0): no reference model is run")
    length_normalized: bool | None = _f(None, "per-token mean log-probs (true) or sums (false); default: the "
                                       "loss's own (IPO: mean, as TRL; false = the paper's sums)")
    ranked: str = _f("all_pairs", "ranked data (>2 responses): expand to all pairs, or plackett_luce",
                     choices=["all_pairs", "plackett_luce"])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    precision: str = _f(
        "auto", "fp32, bf16 (autocast, fp32 master weights), or auto (bf16 where the hardware has it)",
        choices=["fp32", "bf16", "auto"],
    )
    output_dir: str = _f("runs/dpo", "run directory: config, metrics.jsonl, checkpoints/, final/")

    # ------------------------------------------------------------------ validation
    @property
    def prompt_budget(self) -> int:
        """data.max_prompt_length, or half of data.max_length when it is not set."""
        d = self.data
        return d.max_prompt_length if d.max_prompt_length is not None else d.max_length // 2

    def validate(self, stage: str = "dpo") -> Config:
        """Every check of a value and of a combination of keys, in one place; raise ConfigError with a way out.

        ``stage`` is the command the config is for (``sft`` or ``dpo``): options that a stage would ignore are
        refused, never silently dropped.
        """
        from dpokit.losses import resolve_loss

        t, d, lo, m = self.train, self.data, self.loss, self.model
        for key, value in flat_items(self):
            choices = field_meta(key).get("choices")
            if choices and any(v not in choices for v in (value if isinstance(value, list) else [value])):
                raise ConfigError(f"{key}={short(value)} is not one of {choices}")
        positive = {
            "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.log_steps": t.log_steps,
            "data.max_length": d.max_length, "train.logit_chunk_tokens": t.logit_chunk_tokens,
            "train.keep_last": t.keep_last, "data.max_field_chars": d.max_field_chars,
        }
        if d.max_prompt_length is not None:
            positive["data.max_prompt_length"] = d.max_prompt_length
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if t.batch_size % t.grad_accum:
            raise ConfigError(
                f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}: "
                "batch_size counts pairs per optimizer step, split evenly into grad_accum micro-batches"
            )
        if d.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2 (a prompt token and a completion token), got "
                              f"{d.max_length}")
        if self.prompt_budget >= d.max_length:
            raise ConfigError(
                f"data.max_prompt_length={d.max_prompt_length} must be smaller than data.max_length={d.max_length}"
            )
        if t.max_steps is not None and t.epochs is not None:
            raise ConfigError("train.max_steps and train.epochs are mutually exclusive: set one of them")
        if t.max_steps is not None and t.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {t.max_steps}")
        if t.epochs is not None and t.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0, got {t.epochs}")
        if t.lr is not None and not t.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {t.lr}")
        if not 0 <= t.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        if t.save_steps < 0 or t.max_grad_norm < 0 or t.weight_decay < 0 or t.snapshot_steps < 0:
            raise ConfigError("train.save_steps, train.snapshot_steps, train.max_grad_norm and train.weight_decay "
                              "must be >= 0")
        for key in ("train.adam_beta1", "train.adam_beta2"):
            if not 0 <= get_key(self, key) < 1:
                raise ConfigError(f"{key} must be in [0, 1), got {get_key(self, key)}")
        if not t.adam_eps > 0:
            raise ConfigError(f"train.adam_eps must be > 0 (it keeps AdamW's division finite), got {t.adam_eps}")
        if not 0 <= t.seed < 2**63:
            raise ConfigError(f"train.seed must be in [0, 2**63), got {t.seed}")
        if t.forward_tokens is not None and t.forward_tokens < 0:
            raise ConfigError(f"train.forward_tokens must be >= 0 (0: never split), got {t.forward_tokens}")
        if t.max_nonfinite < 0 or t.displacement_nats < 0:
            raise ConfigError("train.max_nonfinite and train.displacement_nats must be >= 0")
        if not lo.beta > 0:
            raise ConfigError(f"loss.beta must be > 0, got {lo.beta}")
        if lo.label_smoothing is not None and not 0 <= lo.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {lo.label_smoothing}")
        if m.lora_r < 0:
            raise ConfigError(f"model.lora_r must be >= 0, got {m.lora_r}")
        lora_default = ModelConfig()
        lora_set = [k for k in ("lora_alpha", "lora_dropout", "lora_target_modules")
                    if getattr(m, k) != getattr(lora_default, k)]
        if not m.lora_r and lora_set:
            raise ConfigError(f"model.{lora_set[0]} has no effect without model.lora_r > 0")
        if not 0 <= m.lora_dropout < 1:
            raise ConfigError(f"model.lora_dropout must be in [0, 1), got {m.lora_dropout}")
        if lo.rpo_alpha < 0:
            raise ConfigError(f"loss.rpo_alpha must be >= 0, got {lo.rpo_alpha}")
        for key in ("loss.gamma", "loss.cpo_alpha", "loss.dpop_lambda", "loss.desirable_weight",
                    "loss.undesirable_weight"):
            if get_key(self, key) is not None and get_key(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {get_key(self, key)}")
        if lo.tau is not None and not lo.tau > 0:
            raise ConfigError(f"loss.tau must be > 0 (it divides the log-ratio), got {lo.tau}")
        if any(w < 0 for w in lo.weights) or (lo.weights and not any(lo.weights)):
            raise ConfigError(f"loss.weights must be >= 0 and not all 0, got {lo.weights}")
        if not m.lora_alpha > 0:
            raise ConfigError(f"model.lora_alpha must be > 0, got {m.lora_alpha}")
        if lo.weights and len(lo.weights) != len(lo.name.split(",")):
            raise ConfigError(f"loss.weights has {len(lo.weights)} entries but loss.name names "
                              f"{len(lo.name.split(','))} losses")
        if t.fsdp_bf16_params and t.distributed != "fsdp":
            raise ConfigError("train.fsdp_bf16_params has no effect unless train.distributed=fsdp")
        if not t.dist_timeout > 0:
            raise ConfigError(f"train.dist_timeout must be > 0 seconds, got {t.dist_timeout}")
        for key, value, files in (("data.split", d.split if d.split != "train" else None, d.train_files),
                                  ("data.eval_split", d.eval_split, d.eval_files)):
            if value is not None and files and all(Path(f).is_file() for f in files):
                raise ConfigError(f"{key}={value!r} has no effect: every path of it is a plain file "
                                  "(it selects a split of a hub dataset or a save_to_disk DatasetDict folder)")
        if d.eval_split is not None and not d.eval_files:
            raise ConfigError("data.eval_split has no effect without data.eval_files (--eval-data)")
        if stage in ("sft", "rm"):
            default = LossConfig()
            for f in dataclasses.fields(LossConfig):
                if getattr(lo, f.name) != getattr(default, f.name):
                    raise ConfigError(f"loss.{f.name}={getattr(lo, f.name)!r} has no effect on `dpokit {stage}` "
                                      "(no preference loss)")
            for key in ("model.ref_name_or_path", "train.ref_cache"):
                if get_key(self, key) is not None:
                    raise ConfigError(f"{key} has no effect on `dpokit {stage}` (no reference)")
            if stage == "sft" and d.eval_files:
                raise ConfigError("data.eval_files has no effect on `dpokit sft` (no held-out evaluation there); "
                                  "evaluate the result with `dpokit eval`")
            return self
        loss = resolve_loss(lo)
        if not loss.paired and t.batch_size // t.grad_accum < 2:
            raise ConfigError("kto estimates its KL baseline inside each micro-batch: batch_size / grad_accum "
                              "must be >= 2")
        if not loss.paired and t.forward_tokens:
            raise ConfigError("train.forward_tokens: kto estimates its KL baseline over a whole micro-batch, so its "
                              "micro-batches are never split; use train.grad_accum to bound memory")
        if m.ref_name_or_path and not loss.reference:
            raise ConfigError(f"model.ref_name_or_path is set but loss '{lo.name}' runs no reference")
        if t.ref_cache and not loss.reference:
            raise ConfigError(f"train.ref_cache: loss '{lo.name}' runs no reference: it has none to cache")
        if t.ref_cache and not loss.paired:
            raise ConfigError("train.ref_cache: kto's KL rows pair each prompt with another example's completion, "
                              "so they change with the batch and cannot be cached exactly")
        return self


# ---------------------------------------------------------------------- key handling
def _sections() -> dict[str, type]:
    fields = dataclasses.fields(Config)
    return {f.name: f.default_factory for f in fields if dataclasses.is_dataclass(f.default_factory)}


def all_keys() -> list[str]:
    """Every dotted key, in declaration order."""
    keys = []
    for f in dataclasses.fields(Config):
        if f.name in _sections():
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(_sections()[f.name])]
        else:
            keys.append(f.name)
    return keys


def _field(key: str) -> dataclasses.Field:
    parts = key.split(".")
    cls: type = Config
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise _unknown(key)
        f = fields[part]
        if i < len(parts) - 1:
            if part not in _sections():
                raise _unknown(key)
            cls = _sections()[part]
        elif part in _sections():
            raise _unknown(key)
    return f


def field_meta(key: str) -> dict:
    return dict(_field(key).metadata)


def _unknown(key: str) -> ConfigError:
    from dpokit.trl_names import trl_hint

    if trl := trl_hint(key):
        return ConfigError(f"unknown config key '{key}'; {trl}")
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # a bare field name typed without its section: suggest by the last part
        tails = {k.split(".")[-1]: k for k in all_keys()}
        hit = difflib.get_close_matches(key.split(".")[-1], list(tails), n=1, cutoff=0.6)
        close = [tails[hit[0]]] if hit else []
    hint = f"; did you mean '{close[0]}'?" if close else "; see `dpokit dpo --help` for every key"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _resolve_type(tp: Any) -> tuple[type, bool, bool]:
    """(base type, is optional, is list) of a field annotation."""
    if isinstance(tp, str):
        tp = eval(tp, {"list": list, "str": str, "int": int, "float": float, "bool": bool, "None": None})
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
        origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], optional, True
    return tp, optional, False


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError naming the key."""
    base, optional, is_list = _resolve_type(_field(key).type)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [coerce_scalar(key, base, v) for v in items]
    return coerce_scalar(key, base, value)


def coerce_scalar(key: str, base: type, value: Any) -> Any:
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ValueError
        if base is int:
            if isinstance(value, str):  # '1e20' (YAML 1.1 reads it as text)
                value = float(value) if any(c in value.lower() for c in ".e") else int(value)
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
            if not -(2**63) <= number < 2**63:
                raise ConfigError(f"{key}={short(value)} is out of range (a 64-bit integer)")
            return number
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{key}={short(value)}: must be a finite number")
            if abs(number) > FLOAT32_MAX:
                raise ConfigError(f"{key}={short(value)}: too large for fp32 arithmetic (|x| <= {FLOAT32_MAX:.3g})")
            return number
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        pass
    raise ConfigError(f"{key}: expected {base.__name__}, got {short(value)}")


def set_key(cfg: Config, key: str, value: Any) -> None:
    value = coerce(key, value)
    obj: Any = cfg
    *head, last = key.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def get_key(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def flat_items(cfg: Config) -> list[tuple[str, Any]]:
    return [(k, get_key(cfg, k)) for k in all_keys()]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in _sections():
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-5`` -> ('train.lr', 1e-05). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"expected key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if key in all_keys():
        base, _, is_list = _resolve_type(_field(key).type)
        if base is str and not (is_list and raw.lstrip().startswith("[")):
            return key, raw  # a string key takes the text as written: output_dir=010 is "010", not 8
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):  # not YAML (or a number too long to read): the text itself
        value = raw
    return key, value


def _is_text(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str)
                                                                                        for v in value))


def load_config(
    yaml_path: str | Path | None = None,
    overrides: list[tuple[str, Any]] | None = None,
    base: Config | None = None,
    stage: str = "dpo",
) -> Config:
    """Build a validated Config from defaults, an optional YAML file and (key, value) overrides."""
    cfg = base or Config()
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = read_yaml(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, ValueError) as e:
            message = " ".join(str(e).split())
            raise ConfigError(f"{path}: not valid YAML: {message[:300]}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read as a UTF-8 text file ({type(e).__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        for key, value in _flatten(data).items():
            try:
                if key in all_keys() and _resolve_type(_field(key).type)[0] is str and not _is_text(value):
                    raise ConfigError(f"{key}: expected a string, got {short(value)} (YAML read it as "
                                      f"{type(value).__name__}; put it in quotes)")
                set_key(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    for key, value in overrides or []:
        set_key(cfg, key, value)
    return cfg.validate(stage)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path, header: str = "") -> None:
    """``cfg`` as YAML (every key), after ``header`` comment lines."""
    from dpokit.safety import redact, redact_values

    Path(path).write_text(redact(header) + yaml.safe_dump(redact_values(to_dict(cfg)), sort_keys=False))
