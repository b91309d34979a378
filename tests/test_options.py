"""No silent no-ops: every config key either changes what is computed (shown here) or is refused
in the combinations where it cannot apply. A new key without an entry here fails the first test."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dpokit.config import ConfigError, all_keys, load_config

CHECKED: set[str] = set()


def covers(*keys: str):
    CHECKED.update(keys)
    return lambda fn: fn


# ---------------------------------------------------------------- a toy model for the loop's keys
@dataclass
class ToyBatch:
    x: torch.Tensor
    y: torch.Tensor
    tokens: int

    def to(self, device):
        return ToyBatch(self.x.to(device), self.y.to(device), self.tokens)


class ToyRecipe:
    """Least squares on a linear model: the loop's keys without a language model."""

    name, throughput_name, postfix, keys = "toy", "examples_per_s", ("loss",), ("loss",)

    def __init__(self):
        self.calls = 0

    def collate(self, chunk, index):
        return ToyBatch(torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk]), len(chunk))

    def units(self, chunk):
        return len(chunk)

    def compute(self, model, batch, denom):
        self.calls += 1
        loss = (model(batch.x) - batch.y).pow(2).sum() / denom
        return loss, {"loss": (loss.detach() * denom, len(batch.x))}


def _toy(overrides, tmp_path: Path, items=None):
    from conftest import toy_job

    from dpokit.train.loop import fit

    g = torch.Generator().manual_seed(0)
    items = items or [(torch.randn(4, generator=g), torch.randn(1, generator=g)) for _ in range(8)]
    cfg = load_config(None, [("train.batch_size", 4), ("train.max_steps", 4), ("train.warmup_ratio", 0.0),
                             *overrides])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    recipe = ToyRecipe()
    result = fit(toy_job(cfg, model, recipe, items, run, cfg.train.lr or 0.1))
    return result, torch.cat([p.detach().flatten() for p in model.parameters()]), {"compute": recipe.calls}, run


def _differs(a, b) -> bool:
    return not torch.allclose(a, b)


@covers("train.lr", "train.weight_decay", "train.adam_beta1", "train.adam_beta2", "train.adam_eps",
        "train.max_grad_norm", "train.seed", "train.scheduler", "train.warmup_ratio")
@pytest.mark.parametrize("key,value", [
    ("train.lr", 0.3), ("train.weight_decay", 0.5), ("train.adam_beta1", 0.5), ("train.adam_beta2", 0.9),
    ("train.adam_eps", 1.0), ("train.max_grad_norm", 0.01), ("train.seed", 7), ("train.scheduler", "constant"),
    ("train.warmup_ratio", 0.5),
])
def test_update_keys_change_the_weights(tmp_path, key, value):
    base = _toy([], tmp_path)[1]
    assert _differs(_toy([(key, value)], tmp_path)[1], base), key


@covers("train.batch_size", "train.max_steps", "train.epochs", "train.log_steps", "train.grad_accum")
def test_length_and_split_keys(tmp_path):
    assert len(_toy([("train.max_steps", 2)], tmp_path)[0].history) == 2
    assert _toy([("train.max_steps", None), ("train.epochs", 2.0)], tmp_path)[0].steps == 4  # 8 items / 4 per step
    assert _toy([("train.max_steps", None), ("train.epochs", 1.0), ("train.batch_size", 2)], tmp_path)[0].steps == 4
    assert [r["step"] for r in _toy([("train.log_steps", 2)], tmp_path)[0].history] == [2, 4]
    one, w1, c1, _ = _toy([], tmp_path)
    four, w4, c4, _ = _toy([("train.grad_accum", 4)], tmp_path)
    assert c1["compute"] == 4 and c4["compute"] == 16  # micro-batches of 1: four forwards per step...
    torch.testing.assert_close(w1, w4)  # ...and the same update


@covers("train.save_steps", "train.keep_last", "train.max_nonfinite")
def test_checkpoint_and_nonfinite_keys(tmp_path):
    run = _toy([("train.save_steps", 1), ("train.keep_last", 3)], tmp_path)[3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3", "step-4"]
    run = _toy([("train.save_steps", 0)], tmp_path)[3]
    assert not (run / "checkpoints").exists()  # checkpoints only when asked for
    run = _toy([("train.save_steps", 3)], tmp_path)[3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-4"]  # and the last step
    bad = [(torch.full((4,), float("nan")), torch.zeros(1))] + [(torch.ones(4), torch.zeros(1))] * 7
    from dpokit.train.loop import NonFiniteError

    with pytest.raises(NonFiniteError):
        _toy([("train.max_nonfinite", 0), ("train.batch_size", 1), ("train.max_steps", 8)], tmp_path, items=bad)
    res = _toy([("train.max_nonfinite", 1), ("train.batch_size", 1), ("train.max_steps", 8)], tmp_path, items=bad)[0]
    assert res.history[-1]["nonfinite_skipped"] == 1


@covers("train.snapshot_steps")
def test_snapshot_steps_writes_weights_that_are_never_pruned(tmp_path, tiny_model_dir, pairs_file):
    from conftest import run_cli

    def run(name, *extra):
        assert run_cli("dpo", "--model", tiny_model_dir, "--data", pairs_file, "--output-dir", tmp_path / name,
                       "--max-steps", 3, "train.batch_size=4", "precision=fp32", *extra) == 0
        return tmp_path / name

    snaps = run("a", "train.snapshot_steps=1", "train.keep_last=1") / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step-1", "step-2"]  # step 3 is final/
    assert (snaps / "step-1" / "config.json").is_file() and (snaps / "step-1" / "model.safetensors").is_file()
    assert not (run("b") / "snapshots").exists()


# -------------------------------------------------------------------------------- data keys
@covers("data.max_length", "data.max_prompt_length", "data.prompt_truncation")
def test_truncation_keys(tokenizer, tmp_path):
    from dpokit.train.build import load_stage_items

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": " ".join(f"w{i}" for i in range(40)), "chosen": " good" * 20,
                                "rejected": " bad" * 3}) + "\n")

    def lengths(over):
        cfg = load_config(None, over)
        p = load_stage_items(cfg, "paired", [str(data)], tokenizer, "train", tmp_path)[0]
        return len(p.prompt_ids), len(p.chosen_ids), p.prompt_ids[0]

    base = lengths([])
    assert lengths([("data.max_length", 40), ("data.max_prompt_length", 20)])[:2] == (20, 20)
    assert lengths([("data.max_length", 40), ("data.max_prompt_length", 10)])[:2] == (10, 21)  # 20 words + EOS fit
    assert base[:2] != (20, 20)
    left = lengths([("data.max_length", 40), ("data.max_prompt_length", 10)])[2]
    right = lengths([("data.max_length", 40), ("data.max_prompt_length", 10), ("data.prompt_truncation", "right")])[2]
    assert left != right
    # max_length alone gives a working prompt budget: half of it
    assert lengths([("data.max_length", 40)])[:2] == (20, 20)


@covers("data.train_files", "data.eval_files", "data.skip_bad_records", "data.split", "output_dir",
        "model.name_or_path", "model.ref_name_or_path")
def test_data_and_model_keys_through_a_run(tmp_path, tiny_model_dir, pairs_file):
    from dpokit.train.dpo import run_dpo

    def run(name, *over):
        cfg = load_config(None, [("model.name_or_path", str(tiny_model_dir)), ("data.train_files", [str(pairs_file)]),
                                 ("output_dir", str(tmp_path / name)), ("train.max_steps", 1),
                                 ("train.batch_size", 4), ("precision", "fp32"), *over])
        run_dpo(cfg)
        return [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    plain = run("plain")
    assert (tmp_path / "plain" / "final").is_dir()  # output_dir
    assert "eval/loss" in run("eval", ("data.eval_files", [str(pairs_file)]))[-1]
    # a different reference: step 0 is no longer ln 2
    other_ref = tmp_path / "ref"
    from conftest import make_tiny
    from transformers import AutoTokenizer

    make_tiny(seed=99).save_pretrained(other_ref)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other_ref)
    assert run("with-ref", ("model.ref_name_or_path", str(other_ref)))[0]["loss"] != plain[0]["loss"]
    # a different policy: different log-probs
    assert run("policy", ("model.name_or_path", str(other_ref)))[0]["logps/chosen"] != plain[0]["logps/chosen"]
    with pytest.raises(ConfigError, match="data.split='test' has no effect"):
        run("split", ("data.split", "test"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pairs_file.read_text() + "{oops\n")
    from dpokit.data.formats import DataError

    with pytest.raises(DataError):
        run("bad", ("data.train_files", [str(bad)]))
    run("skip", ("data.train_files", [str(bad)]), ("data.skip_bad_records", True))


def test_split_selects_a_datasetdict_split(tmp_path):
    import datasets

    from dpokit.data.formats import load_preferences

    rows = {"train": [{"prompt": "a", "chosen": " b", "rejected": " c"}],
            "test": [{"prompt": "x", "chosen": " y", "rejected": " z"}]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(str(tmp_path / "d"))
    assert load_preferences([str(tmp_path / "d")], split="test")[0].prompt == "x"


@covers("data.eval_split")
def test_eval_split_defaults_to_test_then_validation(tmp_path, tokenizer, pairs_file, caplog):
    import datasets

    from dpokit.data.formats import DataError
    from dpokit.train.build import load_stage_items

    def pairs(n, tag):
        return [{"prompt": f"{tag} {i}", "chosen": " good", "rejected": " bad"} for i in range(n)]

    def folder(name, **splits):
        datasets.DatasetDict({k: datasets.Dataset.from_list(pairs(n, k)) for k, n in splits.items()}).save_to_disk(
            str(tmp_path / name))
        return str(tmp_path / name)

    both, val_only, train_only = (folder("both", train=8, test=3, validation=5), folder("val", train=8, validation=5),
                                  folder("train", train=8))

    def eval_items(path, *over):
        cfg = load_config(None, [("data.train_files", [str(pairs_file)]), ("data.eval_files", [path]), *over])
        return load_stage_items(cfg, "paired", cfg.data.eval_files, tokenizer, "eval", tmp_path)

    with caplog.at_level("INFO", logger="dpokit"):
        assert len(eval_items(both)) == 3
    assert "held-out split 'test'" in caplog.text
    assert len(eval_items(val_only)) == 5
    assert len(eval_items(both, ("data.eval_split", "validation"))) == 5
    assert len(eval_items(both, ("data.eval_split", "train"))) == 8
    with pytest.raises(DataError, match="no test or validation split"):
        eval_items(train_only)
    # training still reads data.split, and the eval split is refused where it would do nothing
    cfg = load_config(None, [("data.train_files", [both]), ("data.eval_files", [both])])
    assert len(load_stage_items(cfg, "paired", cfg.data.train_files, tokenizer, "train", tmp_path)) == 8
    with pytest.raises(ConfigError, match="data.eval_split has no effect without data.eval_files"):
        load_config(None, [("data.train_files", [str(pairs_file)]), ("data.eval_split", "test")])
    with pytest.raises(ConfigError, match="data.eval_split='test' has no effect: every path of it is a plain file"):
        load_config(None, [("data.train_files", [both]), ("data.eval_files", [str(pairs_file)]),
                           ("data.eval_split", "test")])


@covers("model.trust_remote_code", "model.device")
def test_model_loading_keys(monkeypatch, tiny_model_dir):
    import transformers

    from dpokit.models import load_model, pick_device

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_model_dir), trust_remote_code=True)
    assert seen["trust_remote_code"] is True
    load_model(str(tiny_model_dir))
    assert seen["trust_remote_code"] is False
    assert pick_device("cpu") == torch.device("cpu") and pick_device("meta") == torch.device("meta")
    with pytest.raises(RuntimeError):
        pick_device("nonsense")


@covers("train.logit_chunk_tokens")
def test_logit_chunk_bounds_the_head_calls(tiny_model, tokenizer, monkeypatch):
    from dpokit.data.collate import Sequences, padded
    from dpokit.logprobs import LogProbs

    ids = torch.randint(3, 1000, (2, 12)).tolist()
    batch = padded(Sequences.ungrouped([(r[:4], r[4:]) for r in ids]), 0)  # 2 x 8 completion tokens
    calls = []
    head = tiny_model.get_output_embeddings()
    real_forward = head.forward
    monkeypatch.setattr(head, "forward", lambda h: calls.append(h.shape[0]) or real_forward(h))
    with torch.no_grad():
        a, _ = LogProbs(tiny_model, chunk_tokens=5)(batch)
        n_small = len(calls)
        b, _ = LogProbs(tiny_model, chunk_tokens=1024)(batch)
    assert max(calls[:n_small]) <= 5 and n_small == 4 and len(calls) - n_small == 1  # 16 tokens: 5+5+5+1 vs 16
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@covers("precision")
def test_precision_changes_the_arithmetic(tiny_model):
    from dpokit.data.collate import Sequences, padded
    from dpokit.logprobs import LogProbs
    from dpokit.models import autocast

    ids = torch.randint(3, 1000, (2, 10)).tolist()
    batch, logprobs = padded(Sequences.ungrouped([([], r) for r in ids]), 0), LogProbs(tiny_model)
    with torch.no_grad():
        fp32 = logprobs(batch)[0]
        with autocast(torch.device("cpu"), "bf16"):
            bf16 = logprobs(batch)[0]
    assert not torch.equal(fp32, bf16) and torch.allclose(fp32, bf16, rtol=2e-2)
    assert fp32.dtype == bf16.dtype == torch.float32  # log-softmax stays fp32 in both


@covers("train.displacement_nats")
def test_displacement_threshold():
    from dpokit.train.dpo import DisplacementWatch

    rec = lambda: [{"step": 1, "rewards/margins": 0.0, "logratio/chosen": 0.0},  # noqa: E731
                   {"step": 2, "rewards/margins": 1.0, "logratio/chosen": -2.0}]
    for nats, marked in ((1.0, True), (3.0, False), (0.0, False)):
        rs = rec()
        w = DisplacementWatch(nats)
        for r in rs:
            w(r)
        assert rs[1].get("likelihood_displacement", False) is marked


@covers("train.report_to")
def test_report_to_logs_a_run_to_the_named_trackers(tmp_path, tiny_model_dir, pairs_file):
    """A training run sends every metrics line to the tracker named, and to none when none is."""
    pytest.importorskip("tensorboard")
    from conftest import read_metrics, run_cli
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for names in ([], ["tensorboard"]):
        run = tmp_path / f"run{len(names)}"
        assert run_cli("dpo", "--model", tiny_model_dir, "--data", pairs_file, "--output-dir", run, "--max-steps", 2,
                       "train.batch_size=4", f"train.report_to={names}") == 0
        assert (run / "tensorboard").is_dir() == bool(names)
    events = EventAccumulator(str(tmp_path / "run1" / "tensorboard")).Reload()
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx([r["loss"] for r in read_metrics(tmp_path / "run1")], rel=1e-6)
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, [("train.report_to", ["comet"])])


LOSS_KEYS = {"loss.name", "loss.weights", "loss.beta", "loss.label_smoothing", "loss.gamma", "loss.tau",
             "loss.cpo_alpha", "loss.dpop_lambda", "loss.desirable_weight", "loss.undesirable_weight",
             "loss.rpo_alpha", "loss.reference_free", "loss.length_normalized", "loss.ranked"}


@covers(*LOSS_KEYS)
@pytest.mark.parametrize("name,key,value", [
    ("sigmoid", "loss.beta", 0.7), ("sigmoid", "loss.label_smoothing", 0.2), ("simpo", "loss.gamma", 2.0),
    ("discopop", "loss.tau", 0.5), ("cpo", "loss.cpo_alpha", 3.0), ("sigmoid", "loss.dpop_lambda", 5.0),
    ("sigmoid", "loss.rpo_alpha", 1.0), ("sigmoid", "loss.reference_free", True),
    ("sigmoid", "loss.length_normalized", True), ("sigmoid,ipo", "loss.weights", [1.0, 3.0]),
    ("ipo", "loss.name", "hinge"),
])
def test_loss_keys_change_the_loss(name, key, value):
    from dpokit.losses import paired_losses, resolve_loss

    sums, ref, lengths = torch.tensor([-9.0, -5.0]), torch.tensor([-8.0, -6.0]), torch.tensor([4, 3])

    def value_of(over):
        loss = resolve_loss(load_config(None, [("loss.name", name), *over]).loss)
        r = ref if loss.reference else torch.zeros(2)
        return paired_losses(loss, sums, r, lengths)[0].item()

    assert value_of([(key, value)]) != pytest.approx(value_of([]), abs=1e-9), key


@pytest.mark.parametrize("key,value", [("loss.desirable_weight", 2.0), ("loss.undesirable_weight", 2.0)])
def test_kto_weights_change_the_loss(key, value):
    from dpokit.losses import kto_loss

    pol, ref, labels = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([True, False])
    base = kto_loss(pol, ref, labels, torch.tensor(0.1), beta=0.1)[0].sum()
    changed = kto_loss(pol, ref, labels, torch.tensor(0.1), beta=0.1, **{key.split(".")[1]: value})[0].sum()
    assert changed != base


def test_loss_ranked_changes_the_objective():
    from dpokit.losses import plackett_luce_loss, sigmoid_loss

    pol, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -1.5, -1.5]])
    pl = plackett_luce_loss(pol, ref, beta=0.1).item()
    pairs = sum(sigmoid_loss(pol[:, i], pol[:, j], ref[:, i], ref[:, j], beta=0.1)[0].item()
                for i in range(3) for j in range(i + 1, 3))
    assert pl != pytest.approx(pairs)


def test_every_config_key_is_checked():
    import test_bad_inputs  # noqa: F401  (their effect tests register their keys too)
    import test_distributed  # noqa: F401
    import test_speed_paths  # noqa: F401

    missing = set(all_keys()) - CHECKED
    assert not missing, f"config keys with no effect test: {sorted(missing)}"
