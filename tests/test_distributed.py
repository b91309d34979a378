"""torchrun with DDP and FSDP2 on CPU (gloo), against one process: the same global batch gives the same numbers.

One launch of two ranks runs every distributed case (a launch costs seconds); the one-process runs they are
compared with run in this process. Contract (fp32): logged metrics equal to 1e-6, final weights to 1e-5.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PAIRS, read_metrics, run_cli
from safetensors.torch import load_file
from test_options import covers

DRIVER = Path(__file__).parent / "drivers" / "dist_driver.py"
COMMON = ["--max-steps", "3", "train.batch_size=4", "train.grad_accum=2", "train.lr=1e-3", "precision=fp32"]
SKIP = {"tokens_per_s", "pairs_per_s", "examples_per_s", "groups_per_s"}

# name -> extra arguments; every case runs under torchrun (2 ranks) and, without the engine key, in one process
CASES = {
    "ddp-padded": ["train.distributed=ddp", "train.layout=padded", "train.ref_cache=false"],
    "ddp-packed": ["train.distributed=ddp", "train.layout=packed"],
    "ddp-shared": ["train.distributed=ddp", "train.layout=shared_prompt", "train.ref_cache=false"],
    "fsdp-padded": ["train.distributed=fsdp", "train.layout=padded", "train.ref_cache=false"],
    "fsdp-auto": ["train.distributed=fsdp", "--save-steps", "2"],
    "fsdp-shared": ["train.distributed=fsdp", "train.layout=shared_prompt"],
    "ddp-lora": ["train.distributed=ddp", "model.lora_r=4", "train.lr=1e-2", "train.ref_cache=false"],
    "fsdp-lora": ["train.distributed=fsdp", "model.lora_r=4", "train.lr=1e-2"],
}

RM_CASES = {  # dpokit rm: the RewardScores module in each engine
    "rm-ddp": ["train.distributed=ddp", "train.layout=padded"],
    "rm-fsdp": ["train.distributed=fsdp", "train.layout=shared_prompt"],
}


def _args(name: str, model: Path, data: Path, out: Path, extra: list[str], stage: str = "dpo") -> list[str]:
    return [stage, "--model", str(model), "--data", str(data), "--output-dir", str(out / name), *COMMON, *extra]


def _one_process(extra: list[str]) -> list[str]:
    return [a for a in extra if not a.startswith(("train.distributed", "train.fsdp_bf16_params"))]


@pytest.fixture(scope="module")
def launch(tmp_path_factory, tiny_model_dir):
    """Every distributed run, in one torchrun launch of 2 ranks; returns (output root, data files)."""
    out = tmp_path_factory.mktemp("dist")
    data = out / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    ragged = out / "ragged.jsonl"  # 13 pairs: with batch 4 the last step of the epoch holds one pair
    ragged.write_text("".join(json.dumps(PAIRS[i % 8]) + "\n" for i in range(13)))
    plan = [{"argv": _args(name, tiny_model_dir, data, out, extra)} for name, extra in CASES.items()]
    plan += [
        {"argv": ["dpo", "--model", str(tiny_model_dir), "--data", str(ragged), "--output-dir", str(out / "ragged"),
                  "--epochs", "1", "train.batch_size=4", "train.grad_accum=2", "train.lr=1e-3", "precision=fp32",
                  "train.distributed=ddp"]},
        {"argv": _args("sft-fsdp", tiny_model_dir, data, out, ["train.distributed=fsdp", "train.lr=1e-3"], "sft")},
        {"argv": _args("kto-ddp", tiny_model_dir, data, out, ["train.distributed=ddp", "--loss", "kto"])},
        {"argv": _args("rm-ddp", tiny_model_dir, data, out, RM_CASES["rm-ddp"], "rm")},
        {"argv": _args("rm-fsdp", tiny_model_dir, data, out, RM_CASES["rm-fsdp"], "rm")},
        # resume: a 4-step run saving at step 2, then the same run stopped at step 2 resumed under each engine
        {"argv": _args("resume-src", tiny_model_dir, data, out, ["train.distributed=ddp", "--save-steps", "2",
                                                                 "--max-steps", "4"])},
        {"copy": str(out / "resume-src"), "to": str(out / "resume-ddp"), "drop_after": 2},
        {"copy": str(out / "resume-src"), "to": str(out / "resume-fsdp"), "drop_after": 2},
        {"copy": str(out / "resume-src"), "to": str(out / "resume-one"), "drop_after": 2},
        {"argv": _args("resume-ddp", tiny_model_dir, data, out, ["train.distributed=ddp", "--save-steps", "2",
                                                                 "--max-steps", "4", "--resume"])},
        {"argv": _args("resume-fsdp", tiny_model_dir, data, out, ["train.distributed=fsdp", "--save-steps", "2",
                                                                  "--max-steps", "4", "--resume"])},
        # bf16: step 0 is exactly ln 2 with a sharded reference and with a sharded cache
        {"argv": _args("bf16-ddp-cache", tiny_model_dir, data, out, ["train.distributed=ddp", "precision=bf16"])},
        {"argv": _args("bf16-fsdp-copy", tiny_model_dir, data, out, ["train.distributed=fsdp", "precision=bf16",
                                                                     "train.ref_cache=false",
                                                                     "train.fsdp_bf16_params=true"])},
        {"argv": _args("bf16-fsdp-cache", tiny_model_dir, data, out, ["train.distributed=fsdp", "precision=bf16",
                                                                      "train.fsdp_bf16_params=true"])},
    ]
    (out / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DPOKIT_CACHE": str(out / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(DRIVER),
                           str(out / "plan.json")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, data, ragged


def _exit_codes(run: Path) -> list[str]:
    return [(run / f"exit-rank{r}").read_text() for r in range(2)]


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    """Equal to 1e-6, relative to the size of what was summed: ``logratio/chosen`` is the difference of two fp32
    sums of about -60 (an ulp there is 3.8e-6), so its bound scales with them."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb), (set(ra) ^ set(rb))
        for k in set(ra) - SKIP:
            scale = max(1.0, abs(rb[k]), abs(rb.get("logps/chosen", 0.0)) if k.startswith("logratio/") else 0.0)
            assert ra[k] == pytest.approx(rb[k], abs=1e-6 * scale), (ra["step"], k)


def _same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=tol)


def _final_weights(run: Path) -> Path:
    final = run / "final"
    return final / ("adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors")


@covers("train.distributed")
@pytest.mark.parametrize("name", sorted(CASES))
def test_world_two_equals_one_process(name, launch, tiny_model_dir, tmp_path):
    out, data, _ = launch
    assert _exit_codes(out / name) == ["0", "0"]
    assert run_cli(*_args(name, tiny_model_dir, data, tmp_path, _one_process(CASES[name]))) == 0
    _same_metrics(read_metrics(out / name), read_metrics(tmp_path / name))
    _same_weights(_final_weights(out / name), _final_weights(tmp_path / name))
    if name.startswith("ddp"):  # every forward went through the wrapper: the replicas never drifted apart
        hashes = {(out / name / f"weights-rank{r}.sha256").read_text() for r in range(2)}
        assert len(hashes) == 1


def test_ragged_epoch_finishes_and_equals_one_process(launch, tiny_model_dir, tmp_path):
    out, _, ragged = launch
    assert _exit_codes(out / "ragged") == ["0", "0"]
    rows = read_metrics(out / "ragged")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 13 pairs, batch 4: the last step holds one pair
    assert run_cli("dpo", "--model", tiny_model_dir, "--data", ragged, "--output-dir", tmp_path / "ragged",
                   "--epochs", "1", "train.batch_size=4", "train.grad_accum=2", "train.lr=1e-3", "precision=fp32") == 0
    _same_metrics(rows, read_metrics(tmp_path / "ragged"))


def test_sft_under_fsdp_equals_one_process(launch, tiny_model_dir, tmp_path):
    """SFT normalizes by the global count of completion tokens, not by each rank's."""
    out, data, _ = launch
    assert run_cli(*_args("sft-fsdp", tiny_model_dir, data, tmp_path, ["train.lr=1e-3"], "sft")) == 0
    _same_metrics(read_metrics(out / "sft-fsdp"), read_metrics(tmp_path / "sft-fsdp"))
    _same_weights(out / "sft-fsdp" / "final" / "model.safetensors", tmp_path / "sft-fsdp" / "final" / "model.safetensors")


@pytest.mark.parametrize("name", sorted(RM_CASES))
def test_reward_model_under_torchrun_equals_one_process(name, launch, tiny_model_dir, tmp_path):
    out, data, _ = launch
    assert _exit_codes(out / name) == ["0", "0"]
    assert run_cli(*_args(name, tiny_model_dir, data, tmp_path, _one_process(RM_CASES[name]), "rm")) == 0
    _same_metrics(read_metrics(out / name), read_metrics(tmp_path / name))
    _same_weights(_final_weights(out / name), _final_weights(tmp_path / name))


def test_kto_runs_under_ddp(launch):
    """KTO's KL baseline is estimated inside each micro-batch, so its numbers depend on which examples share one
    (world 2 forms other micro-batches than world 1): it runs, without hanging, but is not compared."""
    out, _, _ = launch
    assert _exit_codes(out / "kto-ddp") == ["0", "0"]
    rows = read_metrics(out / "kto-ddp")
    assert len(rows) == 3 and rows[0]["kl"] == 0.0


def test_resume_at_any_world_size_and_engine_equals_the_uninterrupted_run(launch, tiny_model_dir, tmp_path):
    out, data, _ = launch
    whole = read_metrics(out / "resume-src")
    assert [r["step"] for r in whole] == [1, 2, 3, 4]
    for name in ("resume-ddp", "resume-fsdp"):
        _same_metrics(read_metrics(out / name), whole)
        _same_weights(out / name / "final" / "model.safetensors", out / "resume-src" / "final" / "model.safetensors")
    # a 2-rank DCP checkpoint resumed in one process
    one = tmp_path / "resume-one"
    shutil.copytree(out / "resume-one", one)
    assert run_cli(*_args("resume-one", tiny_model_dir, data, tmp_path, ["--save-steps", "2", "--max-steps", "4",
                                                                        "--resume"])) == 0
    _same_metrics(read_metrics(one), whole)
    _same_weights(one / "final" / "model.safetensors", out / "resume-src" / "final" / "model.safetensors")
    state = json.loads((out / "resume-src" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["kind"] == "dcp" and state["world_size"] == 2


def test_bf16_step_zero_is_exactly_ln2_with_sharded_reference_and_cache(launch):
    out, _, _ = launch
    for name in ("bf16-ddp-cache", "bf16-fsdp-copy", "bf16-fsdp-cache"):
        first = read_metrics(out / name)[0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-7), name
        assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0, name


@covers("train.fsdp_bf16_params")
def test_bf16_parameters_change_the_arithmetic(launch):
    out, _, _ = launch
    plain, mixed = read_metrics(out / "fsdp-auto"), read_metrics(out / "bf16-fsdp-cache")
    assert mixed[2]["loss"] != pytest.approx(plain[2]["loss"], abs=1e-7)


def test_fsdp_export_equals_the_gathered_weights_and_generates(launch, tokenizer):
    from transformers import AutoModelForCausalLM

    out, _, _ = launch
    run = out / "fsdp-auto"
    gathered, final = load_file(str(run / "gathered.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    for name, tensor in final.items():
        assert torch.equal(tensor, gathered[name]), name
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied again
    ids = tokenizer("The movie was", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_a_fsdp_checkpoint_resumes_in_one_process_without_an_engine(launch, tiny_model_dir, tmp_path):
    out, data, _ = launch
    run = tmp_path / "fsdp-auto"
    shutil.copytree(out / "fsdp-auto", run, ignore=shutil.ignore_patterns("final", "checkpoints"))
    shutil.copytree(out / "fsdp-auto" / "checkpoints" / "step-2", run / "checkpoints" / "step-2")
    assert run_cli(*_args("fsdp-auto", tiny_model_dir, data, tmp_path, ["--save-steps", "2", "--resume"])) == 0
    _same_metrics(read_metrics(run), read_metrics(out / "fsdp-auto"))
    _same_weights(run / "final" / "model.safetensors", out / "fsdp-auto" / "final" / "model.safetensors")


@covers("train.dist_timeout")
def test_the_collective_timeout_reaches_the_process_group(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """An engine named in one process runs on a world of one, with the configured collective timeout."""
    import torch.distributed as dist

    seen = {}
    real = dist.init_process_group

    def spy(*args, **kwargs):
        seen["timeout"] = kwargs.get("timeout")
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", spy)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert run_cli("dpo", "--model", tiny_model_dir, "--data", pairs_file, "--output-dir", tmp_path / "run",
                   "--max-steps", "1", "train.batch_size=4", "train.distributed=ddp", "train.dist_timeout=42") == 0
    assert seen["timeout"].total_seconds() == 42
    assert not dist.is_initialized()  # the CLI left the group it made


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_restarts_resumes_and_ends_with_the_same_weights(tiny_model_dir, pairs_file,
                                                                                      tmp_path):
    """torchrun --max-restarts 1 with --resume auto: rank 1 is SIGKILLed after the step-2 checkpoint; the job
    restarts, resumes from step 2, and its final weights equal an uninterrupted run's."""
    driver = Path(__file__).parent / "drivers" / "cli_driver.py"
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--max-steps", "4", "--save-steps", "2",
            "train.batch_size=4", "train.grad_accum=2", "train.lr=1e-3", "precision=fp32", "train.distributed=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DPOKIT_CACHE": str(tmp_path / "cache"), "DRIVER_KILL_RANK": "1:2"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts",
                           "1", str(driver), *args, "--output-dir", str(tmp_path / "killed"), "--resume", "auto"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (tmp_path / "killed" / "train.log").read_text()
    assert run_cli(*args[:-1], "--output-dir", tmp_path / "whole") == 0  # one process, uninterrupted
    _same_metrics(read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "whole"))
    _same_weights(tmp_path / "killed" / "final" / "model.safetensors", tmp_path / "whole" / "final" / "model.safetensors")
