"""Every speed path gives the plain path's numbers: packing, the reference cache, gradient
checkpointing, LoRA (reference = adapters off), torch.compile (slow)."""

import json
from pathlib import Path

import pytest
import torch
from test_options import covers

from dpokit.cli import main

BASE = ["--max-steps", "2", "train.batch_size=4", "train.lr=1e-3", "precision=fp32", "train.warmup_ratio=0"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path: Path, name: str, model: Path, data: Path, *extra: str) -> list[dict]:
    assert main(["dpo", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / name),
                 *BASE, *extra]) == 0
    return _metrics(tmp_path / name)


def _close(a: list[dict], b: list[dict], keys=("loss", "rewards/margins", "logps/chosen", "grad_norm"), tol=1e-4):
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], abs=tol, rel=tol), (ra["step"], k)


@covers("train.packing")
def test_packing_gives_the_same_numbers_with_fewer_rows(tmp_path, tiny_model_dir, pairs_file, tokenizer):
    from dpokit.data.collate import collate_pairs
    from dpokit.data.formats import load_preferences
    from dpokit.data.tokenize import tokenize_pair

    plain = _run(tmp_path, "plain", tiny_model_dir, pairs_file)
    packed = _run(tmp_path, "packed", tiny_model_dir, pairs_file, "train.packing=true")
    _close(plain, packed)
    assert packed[0]["loss"] == plain[0]["loss"]  # step 0 is still exactly ln 2
    pairs = [tokenize_pair(tokenizer, e, max_length=256, max_prompt_length=128) for e in load_preferences([str(pairs_file)])]
    padded, pk = collate_pairs(pairs, 2), collate_pairs(pairs, 2, packing=True)
    assert pk["input_ids"].numel() < padded["input_ids"].numel()
    assert int(pk["attention_mask"].sum()) == int(padded["attention_mask"].sum())  # every real token, no more


@covers("train.ref_cache")
def test_reference_cache_matches_and_is_reused_and_invalidated(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    import dpokit.train.dpo as dpo

    calls = []
    real = dpo._logps
    monkeypatch.setattr(dpo, "_logps", lambda m, b, c: calls.append(m.training) or real(m, b, c))
    plain = _run(tmp_path, "plain", tiny_model_dir, pairs_file)
    calls.clear()
    cached = _run(tmp_path, "cached", tiny_model_dir, pairs_file, "train.ref_cache=true")
    assert calls == [True, True]  # two steps, policy forwards only: the reference model is gone
    _close(plain, cached, tol=1e-5)
    files = list((tmp_path / "cache" / "refcache").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    _run(tmp_path, "again", tiny_model_dir, pairs_file, "train.ref_cache=true")
    assert files[0].stat().st_mtime_ns == stamp  # reused, not recomputed
    _run(tmp_path, "longer", tiny_model_dir, pairs_file, "train.ref_cache=true", "data.max_length=12",
         "data.max_prompt_length=6")
    assert len(list((tmp_path / "cache" / "refcache").glob("*.safetensors"))) == 2  # truncation changed: new key


def test_reference_cache_key_depends_on_weights_data_and_precision(tokenizer):
    from conftest import make_tiny

    from dpokit.data.tokenize import TokenizedPair
    from dpokit.refcache import cache_key, model_fingerprint

    a, b = make_tiny(seed=1), make_tiny(seed=2)
    pairs = [TokenizedPair([1, 2], [3], [4])]
    ha, hb = model_fingerprint(a), model_fingerprint(b)
    assert ha == model_fingerprint(make_tiny(seed=1)) and ha != hb
    k = cache_key(ha, pairs, "fp32")
    assert k != cache_key(hb, pairs, "fp32") and k != cache_key(ha, pairs, "bf16")
    assert k != cache_key(ha, [TokenizedPair([1, 2], [3], [5])], "fp32")
    assert k != cache_key(ha, pairs, "fp32", layout="other batches")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_reference_keeps_step_zero_exact(tmp_path, tiny_model_dir, pairs_file, monkeypatch, precision):
    """Computed over the first epoch's own micro-batches, the cache cancels the policy to the bit at step 0."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    for extra in ([], ["train.packing=true"], ["train.shared_prompt=true"]):
        rows = _run(tmp_path, f"{precision}{len(extra)}{extra}", tiny_model_dir, pairs_file, "train.ref_cache=true",
                    f"precision={precision}", "train.grad_accum=2", *extra)
        assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7) and rows[0]["rewards/margins"] == 0.0


@covers("train.logit_chunk_tokens")
def test_logit_memory_is_bounded_by_the_chunk(tiny_model):
    """Nothing the backward pass keeps is as large as the full [completion tokens, vocab] logits."""
    from dpokit.logprobs import sequence_logps

    ids = torch.randint(3, 1000, (4, 40))
    comp = torch.zeros_like(ids)
    comp[:, 8:] = 1  # 4 x 32 = 128 completion positions
    vocab = tiny_model.config.vocab_size
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    tiny_model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums, _ = sequence_logps(tiny_model, ids, torch.ones_like(ids), comp, chunk_tokens=16)
    sums.sum().backward()
    assert max(saved) < 16 * vocab + 1  # at most one chunk of logits, never 128 x vocab
    assert all(p.grad is not None for p in tiny_model.parameters() if p.requires_grad)


@covers("train.gradient_checkpointing")
def test_gradient_checkpointing_same_numbers(tmp_path, tiny_model_dir, pairs_file):
    plain = _run(tmp_path, "plain", tiny_model_dir, pairs_file)
    ckpt = _run(tmp_path, "ckpt", tiny_model_dir, pairs_file, "train.gradient_checkpointing=true")
    _close(plain, ckpt, tol=1e-5)


@covers("model.lora_r", "model.lora_alpha", "model.lora_dropout", "model.lora_target_modules")
def test_lora_reference_is_adapters_off_and_merge_writes_a_full_model(tmp_path, tiny_model_dir, pairs_file, capsys):
    lora = _run(tmp_path, "lora", tiny_model_dir, pairs_file, "model.lora_r=4", "train.lr=1e-2")
    assert lora[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7) and lora[0]["rewards/margins"] == 0.0
    assert lora[1]["rewards/margins"] != 0.0
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "tokenizer.json").is_file()
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(final), "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(), base.state_dict().values()))
    assert (merged / "tokenizer.json").is_file() and not (merged / "adapter_config.json").exists()
    # the other LoRA keys change what is trained
    alpha = _run(tmp_path, "alpha", tiny_model_dir, pairs_file, "model.lora_r=4", "train.lr=1e-2", "model.lora_alpha=64")
    assert alpha[1]["loss"] != lora[1]["loss"]
    narrow = _run(tmp_path, "narrow", tiny_model_dir, pairs_file, "model.lora_r=4", "train.lr=1e-2",
                  "model.lora_target_modules=[q_proj]")
    assert narrow[1]["loss"] != lora[1]["loss"]
    drop = _run(tmp_path, "drop", tiny_model_dir, pairs_file, "model.lora_r=4", "train.lr=1e-2", "model.lora_dropout=0.5")
    assert drop[1]["loss"] != lora[1]["loss"]
    capsys.readouterr()
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(tmp_path / "x"),
                 "model.lora_alpha=8"]) == 2
    assert "no effect without model.lora_r > 0" in capsys.readouterr().err


@pytest.mark.slow
@covers("train.compile")
def test_compile_same_numbers(tmp_path, tiny_model_dir, pairs_file):
    plain = _run(tmp_path, "plain", tiny_model_dir, pairs_file)
    compiled = _run(tmp_path, "compiled", tiny_model_dir, pairs_file, "train.compile=true")
    _close(plain, compiled, tol=1e-4)


def test_speed_options_refused_where_they_cannot_apply(tmp_path, tiny_model_dir, pairs_file, capsys):
    for extra, message in ((["--loss", "simpo", "train.ref_cache=true"], "has none to cache"),
                           (["model.lora_r=4", "train.ref_cache=true"], "adapters-off policy already")):
        assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir",
                     str(tmp_path / "r"), *extra]) == 2
        assert message in capsys.readouterr().err


@covers("train.shared_prompt")
def test_shared_prompt_gives_the_same_numbers(tmp_path, tiny_model_dir, pairs_file, tokenizer):
    from dpokit.data.collate import collate_pairs
    from dpokit.data.formats import load_preferences
    from dpokit.data.tokenize import tokenize_pair

    plain = _run(tmp_path, "plain", tiny_model_dir, pairs_file)
    shared = _run(tmp_path, "shared", tiny_model_dir, pairs_file, "train.shared_prompt=true")
    _close(plain, shared)
    assert shared[0]["loss"] == plain[0]["loss"]
    pairs = [tokenize_pair(tokenizer, e, max_length=256, max_prompt_length=128) for e in load_preferences([str(pairs_file)])]
    sh = collate_pairs(pairs, 2, shared_prompt=True)
    plain_tokens = int(collate_pairs(pairs, 2)["attention_mask"].sum())
    assert int(sh["attention_mask"].sum()) == plain_tokens - sum(len(p.prompt_ids) for p in pairs)  # prompts once
    # rejected tokens never attend to chosen ones
    p0 = pairs[0]
    p, c = len(p0.prompt_ids), len(p0.chosen_ids)
    assert not sh["attention_mask_4d"][0, 0, p + c :, p : p + c].any()


def test_packing_and_shared_prompt_are_exclusive():
    from dpokit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="exclusive"):
        load_config(None, [("train.packing", True), ("train.shared_prompt", True)])
