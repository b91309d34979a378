"""Every speed path gives the plain path's numbers: the layouts (packed, shared prompt, auto), the
reference cache, gradient checkpointing, LoRA (reference = adapters off), torch.compile (slow)."""

from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_cli
from test_options import covers

from dpokit.cli import main

# the plain path: padded rows, a live frozen reference
BASE = ["--max-steps", "2", "train.batch_size=4", "train.lr=1e-3", "precision=fp32", "train.warmup_ratio=0"]
PLAIN = ["train.layout=padded", "train.ref_cache=false"]


def _run(tmp_path: Path, name: str, model: Path, data: Path, *extra: str) -> list[dict]:
    assert run_cli("dpo", "--model", model, "--data", data, "--output-dir", tmp_path / name, *BASE, *PLAIN,
                   *extra) == 0
    return read_metrics(tmp_path / name)


def _pairs(tokenizer, pairs_file):
    from dpokit.data.formats import load_preferences
    from dpokit.data.tokenize import tokenize_pair

    return [tokenize_pair(tokenizer, e, max_length=256, max_prompt_length=128)
            for e in load_preferences([str(pairs_file)])]


def _close(a: list[dict], b: list[dict], keys=("loss", "rewards/margins", "logps/chosen", "grad_norm"), tol=1e-4):
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], abs=tol, rel=tol), (ra["step"], k)


@covers("train.layout")
def test_packing_gives_the_same_numbers_with_fewer_rows(tmp_path, tiny_model_dir, pairs_file, tokenizer):
    from dpokit.data.collate import packed, padded, pair_sequences

    plain = _run(tmp_path, "plain", tiny_model_dir, pairs_file)
    pk_run = _run(tmp_path, "packed", tiny_model_dir, pairs_file, "train.layout=packed")
    _close(plain, pk_run)
    assert pk_run[0]["loss"] == plain[0]["loss"]  # step 0 is still exactly ln 2
    seqs = pair_sequences(_pairs(tokenizer, pairs_file), range(8))[0]
    pd, pk = padded(seqs, 2), packed(seqs, 2)
    assert pk.input_ids.numel() < pd.input_ids.numel()
    assert pk.tokens == pd.tokens == int(pd.attention_mask.sum())  # every real token, no more


@covers("train.ref_cache")
def test_reference_cache_matches_and_is_reused_and_invalidated(tmp_path, tiny_model_dir, pairs_file, monkeypatch,
                                                               forward_log):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    plain = _run(tmp_path, "plain", tiny_model_dir, pairs_file)
    assert forward_log.count("reference:frozen model") == 2 and forward_log.count("model") == 2  # live reference
    forward_log.clear()
    cached = _run(tmp_path, "cached", tiny_model_dir, pairs_file, "train.ref_cache=true")
    # two steps: two policy forwards, the reference served from the cache, filled before step 1 by two no-grad
    # forwards of the policy itself (no copy of it is ever made)
    assert forward_log == ["reference:policy at start", "policy (no grad)"] * 2 + ["reference:cached", "policy"] * 2
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
    from dpokit.train.recipes import PairedRecipe

    a, b = make_tiny(seed=1), make_tiny(seed=2)

    def batches(pairs, layout="padded", index=None):
        return [PairedRecipe(None, None, 0, layout).collate(pairs, index or list(range(len(pairs))))]

    pairs = [TokenizedPair([1, 2], [3], [4]), TokenizedPair([1, 5], [3, 3], [4])]
    ha, hb = model_fingerprint(a), model_fingerprint(b)
    assert ha == model_fingerprint(make_tiny(seed=1)) and ha != hb
    k = cache_key(ha, "fp32", "padded", batches(pairs))
    assert k != cache_key(hb, "fp32", "padded", batches(pairs)) and k != cache_key(ha, "bf16", "padded", batches(pairs))
    assert k != cache_key(ha, "fp32", "padded", batches([TokenizedPair([1, 2], [3], [5]), pairs[1]]))
    assert k != cache_key(ha, "fp32", "padded", batches(pairs, "packed"))  # another layout
    assert k != cache_key(ha, "fp32", "auto", batches(pairs))  # another layout setting
    assert k != cache_key(ha, "fp32", "padded", batches(pairs, index=[1, 0]))  # other batch members


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_reference_keeps_step_zero_exact(tmp_path, tiny_model_dir, pairs_file, monkeypatch, precision):
    """Computed over the first epoch's own micro-batches, the cache cancels the policy to the bit at step 0."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    for extra in (["train.layout=padded"], ["train.layout=packed"], ["train.layout=shared_prompt"],
                  ["train.layout=auto"]):
        rows = _run(tmp_path, f"{precision}{len(extra)}{extra}", tiny_model_dir, pairs_file, "train.ref_cache=true",
                    f"precision={precision}", "train.grad_accum=2", *extra)
        assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7) and rows[0]["rewards/margins"] == 0.0


@covers("train.logit_chunk_tokens")
def test_logit_memory_is_bounded_by_the_chunk(tiny_model):
    """Nothing the backward pass keeps is as large as the full [completion tokens, vocab] logits."""
    from dpokit.data.collate import Sequences, padded
    from dpokit.logprobs import LogProbs

    ids = torch.randint(3, 1000, (4, 40)).tolist()
    batch = padded(Sequences.ungrouped([(r[:9], r[9:]) for r in ids]), 0)  # 4 x 31 = 124 completion positions
    vocab = tiny_model.config.vocab_size
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    tiny_model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums, _ = LogProbs(tiny_model, chunk_tokens=16)(batch)
    sums.sum().backward()
    assert max(saved) < 16 * vocab + 1  # at most one chunk of logits, never 124 x vocab
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
                           (["--loss", "kto", "train.ref_cache=true"], "cannot be cached exactly")):
        assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir",
                     str(tmp_path / "r"), *extra]) == 2
        assert message in capsys.readouterr().err


def test_shared_prompt_gives_the_same_numbers(tmp_path, tiny_model_dir, pairs_file, tokenizer):
    from dpokit.data.collate import padded, pair_sequences, shared_prompt

    plain = _run(tmp_path, "plain", tiny_model_dir, pairs_file)
    shared = _run(tmp_path, "shared", tiny_model_dir, pairs_file, "train.layout=shared_prompt")
    _close(plain, shared)
    assert shared[0]["loss"] == plain[0]["loss"]
    pairs = _pairs(tokenizer, pairs_file)
    seqs = pair_sequences(pairs, range(len(pairs)))[0]
    sh = shared_prompt(seqs, 2)
    pd = padded(seqs, 2)
    assert sh.positions == pd.positions - sum(len(p.prompt_ids) for p in pairs)  # prompts once
    assert sh.tokens == pd.tokens == int(pd.attention_mask.sum())  # the same sequences
    # rejected tokens never attend to chosen ones
    p0 = pairs[0]
    p, c = len(p0.prompt_ids), len(p0.chosen_ids)
    assert not sh.attention_mask[0, 0, p + c :, p : p + c].any()


def test_layout_values_are_checked():
    from dpokit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="is not one of"):
        load_config(None, [("train.layout", "ragged")])


@covers("train.forward_tokens")
def test_forward_tokens_splits_a_micro_batch_into_forwards_with_the_same_update(tmp_path, tiny_model_dir,
                                                                                 pairs_file, forward_log):
    """One pair per forward (a budget of 1 position) against one forward for the micro-batch (0: never split):
    four forwards a step instead of one, the same metrics and the same trained weights."""
    from safetensors.torch import load_file

    # adam_eps=1 keeps Adam's update linear in the gradient, so fp32 noise near g=0 is not amplified to +-lr
    whole = _run(tmp_path, "whole", tiny_model_dir, pairs_file, "train.forward_tokens=0", "train.adam_eps=1")
    assert forward_log.count("policy") == 2  # two steps, one forward each
    forward_log.clear()
    split = _run(tmp_path, "split", tiny_model_dir, pairs_file, "train.forward_tokens=1", "train.adam_eps=1")
    assert forward_log.count("policy") == 8  # four pairs a step, each its own forward
    _close(whole, split, tol=1e-5)
    assert split[0]["loss"] == whole[0]["loss"]  # step 0: ln 2 either way
    w0, w1 = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("whole", "split"))
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name], atol=1e-6, rtol=1e-5)
    assert run_cli("dpo", "--model", tiny_model_dir, "--data", pairs_file, "--output-dir", tmp_path / "kto",
                   "--loss", "kto", "train.forward_tokens=100") == 2  # refused: kto's KL couples a micro-batch


def test_forwards_respect_the_budget_and_pair_up_across_ranks():
    from dpokit.train.loop import StepOrder, split_by_cost

    assert split_by_cost([0, 1, 2, 3], [3, 3, 5, 1], 6) == [[0, 1], [2, 3]]
    assert split_by_cost([0, 1, 2], [9, 2, 2], 4) == [[0], [1, 2]]  # an example over the budget runs alone
    assert split_by_cost([0, 1], [9, 9], 0) == [[0, 1]] and split_by_cost([], [1], 4) == []
    costs = [1, 1, 1, 1, 1, 1, 50, 50]  # two long examples
    for world in (1, 2):
        orders = [StepOrder(8, 8, 2, seed=0, rank=r, world=world, costs=costs, budget=4) for r in range(world)]
        for step in range(3):
            forwards = [o.forwards(step) for o in orders]
            assert len({len(f) for f in forwards}) == 1  # every rank runs as many forwards
            for o, f in zip(orders, forwards):  # ...covering exactly its micro-batches, in order
                assert [i for g in f for i in g] == [i for mb in o.micro_batches(step) for i in mb]
                assert all(len(g) == 1 or sum(costs[i] for i in g) <= 4 for g in f if g)
            assert sorted(i for f in forwards for g in f for i in g) == sorted(orders[0].indices(step))
    assert StepOrder(8, 8, 1, seed=0).forwards(0) == [StepOrder(8, 8, 1, seed=0).indices(0)]  # no costs: unsplit


def test_a_single_logit_chunk_keeps_its_logits_and_gives_the_recomputed_gradient(tiny_model):
    """One chunk is not recomputed in the backward (no second LM-head matmul); several are. Same gradients."""
    from dpokit.data.collate import Sequences, padded
    from dpokit.logprobs import LogProbs

    ids = torch.randint(3, 1000, (3, 20)).tolist()
    batch = padded(Sequences.ungrouped([(r[:6], r[6:]) for r in ids]), 0)  # 3 x 14 completion positions
    head = tiny_model.get_output_embeddings()
    real_forward, calls = head.forward, []
    head.forward = lambda h: calls.append(h.shape[0]) or real_forward(h)
    grads = []
    for chunk in (1024, 16):
        tiny_model.zero_grad()
        calls.clear()
        sums, _ = LogProbs(tiny_model, chunk_tokens=chunk)(batch)
        (sums * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters()})
        assert len(calls) == (1 if chunk == 1024 else 6)  # 42 positions: one call, or 3 chunks twice
    scale = max(g.abs().max().item() for g in grads[0].values())
    for name in grads[0]:  # equal up to fp32 summation order (the chunks split the weight gradient's sum)
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5 * scale, rtol=1e-5)


def test_all_finite_is_exact_whatever_the_sums():
    from dpokit.distributed import ONE, all_finite

    big = torch.full((4,), 3e38)  # finite values whose sum overflows: still finite
    assert all_finite([torch.nn.Parameter(t) for t in (torch.ones(3), big)], ONE)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(5)
        t[2] = bad
        assert not all_finite([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(t)], ONE)
