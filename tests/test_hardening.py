"""Nothing destroyed, nothing mixed, nothing silently wrong: each class of failure as a table of cases.

Run directories (reuse, inputs inside, locks), resumes with a changed run, non-finite weights, damaged
checkpoints and reference caches (random bytes flipped), config values, secrets that are paths, torn
metrics lines, model-card injection, disk errors.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_metrics, run_cli
from test_options import covers

BASE = ["--max-steps", "2", "train.batch_size=4", "train.lr=1e-3", "precision=fp32"]


def _dpo(model: Path, data: Path, out: Path, *extra: object) -> int:
    return run_cli("dpo", "--model", model, "--data", data, "--output-dir", out, *BASE, *extra)


# ------------------------------------------------------------------------------- run directories
def test_an_output_directory_that_holds_what_the_run_reads_is_refused(tmp_path, tiny_model_dir, pairs_file, capsys):
    model = tmp_path / "models" / "sft"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "data" / "prefs.jsonl"
    data.parent.mkdir()
    shutil.copy(pairs_file, data)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    for out, named in ((model, "model.name_or_path"), (tmp_path / "models", "model.name_or_path"),
                       (data.parent, "data.train_files"), (tmp_path, "model.name_or_path")):
        assert _dpo(model, data, out) == 2, out
        assert f"is or contains {named}" in capsys.readouterr().err
    assert _dpo(model, data, tmp_path / "run", "--ref-model", model) == 0  # beside them is fine
    capsys.readouterr()
    assert run_cli("dpo", "--model", model, "--data", data, "--output-dir", "/", *BASE) == 2
    assert "refusing to use /" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing it reads was touched


def test_a_previous_run_is_kept_unless_resumed_or_overwritten(tmp_path, tiny_model_dir, pairs_file, capsys):
    run = tmp_path / "run"
    assert _dpo(tiny_model_dir, pairs_file, run) == 0
    first = (run / "final" / "model.safetensors").read_bytes()
    (run / "notes.txt").write_text("mine")  # a user's own file in the run directory
    capsys.readouterr()
    assert _dpo(tiny_model_dir, pairs_file, run, "train.lr=1e-2") == 2
    assert "holds a previous run" in capsys.readouterr().err
    assert (run / "final" / "model.safetensors").read_bytes() == first  # untouched
    assert _dpo(tiny_model_dir, pairs_file, run, "train.lr=1e-2", "--overwrite") == 0
    assert (run / "final" / "model.safetensors").read_bytes() != first
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite removes only what a dpokit run writes
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("my own numbers\n")
    assert _dpo(tiny_model_dir, pairs_file, other) == 2 and _dpo(tiny_model_dir, pairs_file, other, "--overwrite") == 2
    assert "not a dpokit run directory" in capsys.readouterr().err
    assert (other / "metrics.jsonl").read_text() == "my own numbers\n"


def test_a_second_run_into_a_locked_directory_is_refused(tmp_path, tiny_model_dir, pairs_file, capsys):
    from dpokit.config import load_config
    from dpokit.train.rundir import claim_run_dir, release_run_dir

    run = tmp_path / "run"
    cfg = load_config(None, [("model.name_or_path", str(tiny_model_dir)), ("data.train_files", [str(pairs_file)]),
                             ("output_dir", str(run))])
    claim_run_dir(run, cfg, None, False)  # another run holds it
    try:
        assert _dpo(tiny_model_dir, pairs_file, run, "--overwrite") == 2
        assert "is being written by another dpokit run (pid" in capsys.readouterr().err
    finally:
        release_run_dir(run)
    assert _dpo(tiny_model_dir, pairs_file, run, "--overwrite") == 0


def test_a_run_that_fails_before_its_first_step_leaves_no_directory(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": 1, "rejected": " c"}\n')
    assert _dpo(tiny_model_dir, bad, tmp_path / "run") == 2
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------- resume
def _flip(path: Path, rng: random.Random, n: int = 3) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


LONG = ["--max-steps", "3", "--save-steps", "1", "train.keep_last=5"]


def _resumable(tmp_path: Path, model: Path, data: Path) -> Path:
    """A 3-step run stopped after step 2: its newest checkpoint is step-2."""
    run = tmp_path / "run"
    assert _dpo(model, data, run, *LONG) == 0
    shutil.rmtree(run / "checkpoints" / "step-3")
    shutil.rmtree(run / "final")
    return run


@pytest.mark.parametrize("change,message", [
    (["train.lr=2e-3"], "train.lr: 0.001 then, 0.002 now"),
    (["train.batch_size=2"], "train.batch_size"),
    (["--beta", "0.5"], "loss.beta"),
    (["precision=bf16"], "precision"),
    (["train.layout=packed"], "train.layout"),
    (["--max-steps", "4"], "the run's length changed"),
    (["--max-steps", "1"], "a shorter run cannot be resumed from a later step"),
])
def test_a_resume_that_would_mix_two_runs_is_refused(change, message, tmp_path, tiny_model_dir, pairs_file, capsys):
    run = _resumable(tmp_path, tiny_model_dir, pairs_file)
    capsys.readouterr()
    assert _dpo(tiny_model_dir, pairs_file, run, *LONG, "--resume", *change) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_resume_with_changed_data_or_model_is_refused(tmp_path, tiny_model_dir, pairs_file, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    run = _resumable(tmp_path, model, pairs_file)
    rows = pairs_file.read_text().splitlines()
    pairs_file.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same records, in another order
    assert _dpo(model, pairs_file, run, *LONG, "--resume") == 2
    assert "the data changed since the checkpoint" in capsys.readouterr().err
    pairs_file.write_text("\n".join(rows) + "\n")
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    _flip(weights, random.Random(2), n=1)  # the model changed in place, under the same name
    assert _dpo(model, pairs_file, run, *LONG, "--resume") == 2
    assert "the model changed since the checkpoint" in capsys.readouterr().err
    weights.write_bytes(original)
    assert _dpo(model, pairs_file, run, *LONG, "--resume") == 0  # as it was: resumes


def test_allowed_changes_resume_and_extend_rebuilds_the_schedule(tmp_path, tiny_model_dir, pairs_file, capsys):
    run = _resumable(tmp_path, tiny_model_dir, pairs_file)
    assert _dpo(tiny_model_dir, pairs_file, run, *LONG, "--resume", "train.keep_last=3", "train.log_steps=1") == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert _dpo(tiny_model_dir, pairs_file, run, *LONG, "--resume", "--extend") == 2  # nothing to extend
    assert "nothing to extend" in capsys.readouterr().err
    assert _dpo(tiny_model_dir, pairs_file, run, *LONG, "--max-steps", "5", "--resume", "--extend") == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    from dpokit.train.loop import lr_lambda

    f = lr_lambda(5, 0.1, "linear")  # the new length's schedule from step 4 on
    assert [r["lr"] for r in rows[3:]] == pytest.approx([1e-3 * f(s) for s in (3, 4)])
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 3  # the run's own, kept


# ---------------------------------------------------------------------------------- non-finite
def test_an_update_that_makes_the_weights_non_finite_stops_the_run_and_saves_nothing(tmp_path, tiny_model_dir,
                                                                                   pairs_file, capsys, monkeypatch):
    """Finite loss and gradients, but an update that overflows (simulated: AdamW's step leaves an inf weight)."""
    real_step = torch.optim.AdamW.step

    def overflowing(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    run = tmp_path / "run"
    assert _dpo(tiny_model_dir, pairs_file, run, "--save-steps", "1") == 1
    err = capsys.readouterr().err
    assert "the weights became NaN/inf at step 1" in err and "Last good checkpoint: none" in err
    assert not (run / "final").exists() and not list((run / "checkpoints").glob("step-*"))
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


@covers("train.final_dtype")
def test_final_dtype(tmp_path, tiny_model_dir, pairs_file):
    from safetensors.torch import load_file

    for dtype in ("fp32", "bf16"):
        assert _dpo(tiny_model_dir, pairs_file, tmp_path / dtype, f"train.final_dtype={dtype}") == 0
    w32 = load_file(str(tmp_path / "fp32" / "final" / "model.safetensors"))
    w16 = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in w32.values()) and all(v.dtype == torch.bfloat16 for v in w16.values())
    assert all(torch.equal(w16[k], w32[k].to(torch.bfloat16)) for k in w32)  # the same run, rounded once
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "final").dtype == torch.bfloat16


# ------------------------------------------------------------------------------ fault injection
def test_flipped_bytes_in_checkpoints_are_caught_and_never_resumed(tmp_path, tiny_model_dir, pairs_file, capsys):
    """Random bit flips in random files of the newest checkpoint: resume falls back to the older one (named in the
    log), never uses damaged data and never shows a traceback; the resumed run equals an uninterrupted one."""
    whole = tmp_path / "whole"
    assert _dpo(tiny_model_dir, pairs_file, whole, "--max-steps", "3", "--save-steps", "1", "train.keep_last=5") == 0
    rng = random.Random(0)
    for trial in range(4):
        run = tmp_path / f"t{trial}"
        shutil.copytree(whole, run, ignore=shutil.ignore_patterns("final", ".lock"))
        shutil.rmtree(run / "checkpoints" / "step-3")
        victim = rng.choice(sorted(p for p in (run / "checkpoints" / "step-2").iterdir() if p.is_file()))
        _flip(victim, rng)
        capsys.readouterr()
        assert _dpo(tiny_model_dir, pairs_file, run, "--max-steps", "3", "--save-steps", "1", "train.keep_last=5",
                    "--resume") == 0, victim
        log = (run / "train.log").read_text()
        assert "skipping checkpoint" in log and "resumed from" in log and "step-1 at step 1" in log, victim
        assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(whole)]
        assert "Traceback" not in capsys.readouterr().err


def test_flipped_bytes_in_the_reference_cache_are_caught_and_recomputed(tmp_path, tiny_model_dir, pairs_file,
                                                                       monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    assert _dpo(tiny_model_dir, pairs_file, tmp_path / "a") == 0
    (cache,) = (tmp_path / "cache" / "refcache").glob("*.safetensors")
    rng = random.Random(1)
    for trial in range(3):
        _flip(cache, rng, n=1 + trial)
        run = tmp_path / f"b{trial}"
        assert _dpo(tiny_model_dir, pairs_file, run) == 0
        assert read_metrics(run)[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)  # step 0 still ln 2
        assert "recomputing it" in (run / "train.log").read_text()
    cut = cache.read_bytes()[:200]  # a truncated file
    cache.write_bytes(cut)
    assert _dpo(tiny_model_dir, pairs_file, tmp_path / "c") == 0


# ------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override,message", [
    ("train.seed=1e20", "out of range"), ("train.seed=-1", "train.seed must be in"),
    ("train.weight_decay=nan", "must be a finite number"), ("train.adam_eps=0", "train.adam_eps must be > 0"),
    ("train.adam_beta1=2", "train.adam_beta1 must be in [0, 1)"), ("train.lr=inf", "must be a finite number"),
    ("loss.beta=nan", "must be a finite number"), ("loss.rpo_alpha=-inf", "must be a finite number"),
    ("loss.weights=[1, .nan]", "must be a finite number"), ("model.lora_alpha=nan", "must be a finite number"),
    ("train.max_steps=" + "9" * 5000, "expected int"), ("loss.tau=0", "loss.tau must be > 0"),
    ("train.lr=1e39", "too large for fp32 arithmetic"),
])
def test_bad_config_values_are_one_line_errors(override, message, tmp_path, tiny_model_dir, pairs_file, capsys):
    extra = ["--loss", "discopop"] if override.startswith("loss.tau") else []
    extra += ["model.lora_r=4"] if override.startswith("model.lora") else []
    extra += ["loss.name=sigmoid,ipo"] if override.startswith("loss.weights") else []
    assert _dpo(tiny_model_dir, pairs_file, tmp_path / "run", override, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_yaml_aliases_are_refused_and_string_keys_are_taken_as_written(tmp_path, tiny_model_dir, pairs_file, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
                    + "".join(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
                              for p, c in zip("abcdefgh", "bcdefghi")) + "train:\n  seed: *i\n")
    assert run_cli("dpo", "--config", bomb) == 2
    assert "aliases (*name) are not allowed" in capsys.readouterr().err
    from dpokit.config import load_config, parse_override

    assert load_config(None, [parse_override("output_dir=010")]).output_dir == "010"  # not 8 (YAML 1.1 octal)
    quoted = tmp_path / "c.yaml"
    quoted.write_text("output_dir: 010\n")
    assert run_cli("dpo", "--config", quoted) == 2
    assert "put it in quotes" in capsys.readouterr().err


# ---------------------------------------------------------------------- secrets, logs, model cards
def test_a_secret_named_variable_holding_a_path_does_not_corrupt_the_config(tmp_path, tiny_model_dir, pairs_file,
                                                                           monkeypatch):
    monkeypatch.setenv("SFT_MODEL_KEY", str(tiny_model_dir))  # a path, kept in a variable with a secret-like name
    monkeypatch.setenv("HF_TOKEN", "hf_realsecretvalue987")
    run = tmp_path / "run"
    assert _dpo(tiny_model_dir, pairs_file, run, "--save-steps", "2") == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())  # still valid YAML
    assert cfg["model"]["name_or_path"] == str(tiny_model_dir)
    assert run_cli("dpo", "--config", run / "config.yaml", "--resume") == 0  # the documented resume works
    assert all("hf_realsecretvalue987" not in p.read_text(errors="ignore") for p in run.rglob("*")
               if p.is_file() and p.suffix in (".yaml", ".log", ".md", ".json", ".jsonl"))


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path, tiny_model_dir, pairs_file):
    run = _resumable(tmp_path, tiny_model_dir, pairs_file)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.6')  # a kill in the middle of a write
    assert _dpo(tiny_model_dir, pairs_file, run, *LONG, "--resume") == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert "not a complete metrics line" in (run / "train.log").read_text()


def test_model_card_values_cannot_break_out_of_their_line(tmp_path):
    from dpokit.config import load_config
    from dpokit.train.rundir import model_card

    evil = str(tmp_path / "x\n---\nbase_model: evil/model\n# Injected`")
    cfg = load_config(None, [("model.name_or_path", evil), ("data.train_files", [evil])])
    card = model_card(cfg, "dpo", {})
    front = card.split("---")[1]
    assert "evil/model" not in front and "\n# Injected" not in card and card.count("\n---\n") == 1


def test_a_full_disk_or_read_only_directory_is_one_line(tmp_path, tiny_model_dir, pairs_file, monkeypatch, capsys):
    import errno

    import dpokit.train.checkpoint as ckpt

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "final"))

    monkeypatch.setattr(ckpt, "export_final", full)
    assert _dpo(tiny_model_dir, pairs_file, tmp_path / "run") == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dpokit: error: ") and "No space left on device" in last and "Traceback" not in err
