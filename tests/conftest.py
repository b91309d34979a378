"""Fixtures: a real tokenizer (SmolLM2's, read once from the embedded GGUF) and tiny random
Llama-style models built from a config. No network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dpokit.models import load_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer("smollm2").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from dpokit.models import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


def tiny_config(vocab_size: int = 49152):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )


def make_tiny(seed: int = 0, vocab_size: int = 49152):
    """A random tiny Llama; with a ``vocab_size`` below the tokenizer's, only its first ids (a policy small enough
    to enumerate)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture()
def tiny_model():
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A saved tiny model + the real tokenizer: what a user's HF directory looks like."""
    out = tmp_path_factory.mktemp("tiny-llama")
    make_tiny().save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def save_tiny_vocab(out: Path, tokenizer_dir: Path, vocab_size: int = 64) -> Any:
    """A tiny model of the tokenizer's first ``vocab_size`` ids saved at ``out`` with the tokenizer (returned)."""
    from transformers import AutoTokenizer

    make_tiny(vocab_size=vocab_size).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(out)
    return tokenizer


PAIRS = [
    {"prompt": "The movie was", "chosen": " wonderful and moving.", "rejected": " dull and far too long."},
    {"prompt": "I thought the acting", "chosen": " was superb throughout.", "rejected": " was wooden."},
    {"prompt": "The plot", "chosen": " kept me guessing.", "rejected": " made no sense at all, sadly."},
    {"prompt": "Overall,", "chosen": " a delight.", "rejected": " a waste of an evening."},
    {"prompt": [{"role": "user", "content": "Review the film."}],
     "chosen": [{"role": "assistant", "content": "A joyful triumph."}],
     "rejected": [{"role": "assistant", "content": "A tedious mess."}]},
    {"prompt": "The soundtrack", "chosen": " soared.", "rejected": " grated on me."},
    {"prompt": "Its director", "chosen": " has outdone herself.", "rejected": " lost the thread."},
    {"prompt": "By the end", "chosen": " I was in tears of joy.", "rejected": " I was asleep."},
]


def write_pairs(path: Path) -> Path:
    """PAIRS as a JSONL file at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


@pytest.fixture()
def pairs_file(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches (reference log-probs, converted models) go to a temporary directory, never the user's home."""
    if "DPOKIT_CACHE" not in os.environ:
        os.environ["DPOKIT_CACHE"] = str(tmp_path_factory.mktemp("dpokit-cache"))


# ----------------------------------------------------------------------------- shared helpers
def run_cli(*args: object) -> int:
    """``dpokit ARGS`` in this process; returns the exit code."""
    from dpokit.cli import main

    return main([str(a) for a in args])


def tiny_dpo_run(tmp: Path, model_dir: Path, name: str, steps: int, *options: object) -> Path:
    """A real ``dpokit dpo`` run on PAIRS at a large learning rate (batch 4, fp32), so the policy moves away from
    its reference in a few steps; returns TMP/NAME."""
    run = tmp / name
    assert run_cli("dpo", "--model", model_dir, "--data", write_pairs(tmp / "pairs.jsonl"), "--output-dir", run,
                   "--max-steps", steps, "train.batch_size=4", "train.lr=1e-2", "precision=fp32", *options) == 0
    return run


def read_metrics(run: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl."""
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def forward_log(monkeypatch):
    """Every model call of a run, in order: 'policy' (a forward of the trained LogProbs module with gradients),
    'policy (no grad)' (the same module without: filling the reference cache, the adapters-off reference),
    'reference:<kind>' (each ``Reference.logps`` call) and 'model' (a forward of any other LogProbs module: a
    frozen reference)."""
    import dpokit.train.build as build
    import dpokit.train.dpo as dpo
    import dpokit.train.sft as sft
    from dpokit.logprobs import LogProbs
    from dpokit.reference import Reference

    calls: list[str] = []
    policies: set[int] = set()
    real_module, real_forward, real_logps = build.policy_module, LogProbs.forward, Reference.logps

    def policy_module(*args, **kwargs):
        module = real_module(*args, **kwargs)
        policies.add(id(module))
        return module

    def forward(self, batch, **kw):
        if id(self) in policies:
            calls.append("policy" if torch.is_grad_enabled() else "policy (no grad)")
        else:
            calls.append("model")
        return real_forward(self, batch, **kw)

    def logps(self, batch):
        calls.append(f"reference:{self.kind}")
        return real_logps(self, batch)

    for owner in (build, dpo, sft):
        monkeypatch.setattr(owner, "policy_module", policy_module)
    monkeypatch.setattr(LogProbs, "forward", forward)
    monkeypatch.setattr(Reference, "logps", logps)
    return calls


def toy_job(cfg, model, recipe, items, run_dir: Path, lr: float = 0.1):
    """A Job for the loop around any module and recipe (tests of the loop's own keys on a toy model)."""
    from dpokit.train.loop import Job, step_order
    from dpokit.train.rundir import Session

    run_dir.mkdir(parents=True, exist_ok=True)
    session = Session(cfg, run_dir, torch.device("cpu"), "fp32", None, "toy")
    return Job(session=session, policy=model, recipe=recipe, items=list(items), order=step_order(cfg, len(items)),
               lr=lr, tokenizer=None)
