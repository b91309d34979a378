from pathlib import Path

import pytest

from dpokit.cli import build_parser, main
from dpokit.config import Config, ConfigError, all_keys, load_config, parse_override


def test_defaults_validate():
    cfg = load_config()
    assert cfg.loss.name == "sigmoid" and cfg.loss.beta == 0.1 and cfg.precision == "auto"


def test_yaml_then_overrides_win(tmp_path: Path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 1.0e-5\n  batch_size: 4\nloss:\n  beta: 0.3\n")
    cfg = load_config(y, [parse_override("train.lr=3e-6"), parse_override("data.train_files=[a.jsonl, b.jsonl]")])
    assert cfg.train.lr == pytest.approx(3e-6)
    assert cfg.train.batch_size == 4 and cfg.loss.beta == 0.3
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    "key,expected",
    [("train.lrr", "train.lr"), ("loss.bta", "loss.beta"), ("beta", "loss.beta"), ("data.max_len", "data.max_length")],
)
def test_unknown_key_suggests_closest(key: str, expected: str):
    with pytest.raises(ConfigError, match=f"did you mean '{expected}'"):
        load_config(None, [(key, 1)])


def test_unknown_yaml_key_names_file(tmp_path: Path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  bach_size: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'train.bach_size'; did you mean 'train.batch_size'"):
        load_config(y)


@pytest.mark.parametrize(
    "override,message",
    [
        (("train.batch_size", 6), None),
        (("train.batch_size", "four"), "train.batch_size: expected int"),
        (("loss.beta", 0), "loss.beta must be > 0"),
        (("precision", "fp16"), "precision='fp16' is not one of"),
        (("train.grad_accum", 4), "not divisible by train.grad_accum"),
        (("data.max_prompt_length", 4096), "must be smaller than data.max_length"),
        (("loss.label_smoothing", 0.7), "label_smoothing must be in"),
    ],
)
def test_validation(override, message):
    overrides = [override] + ([("train.batch_size", 6)] if override[0] == "train.grad_accum" else [])
    if message is None:
        load_config(None, overrides)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_max_steps_and_epochs_are_exclusive():
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_config(None, [("train.max_steps", 10), ("train.epochs", 2)])


def test_help_documents_every_key_with_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in all_keys():
        assert f"--{key}" in text
    assert "(default: 0.1)" in text and "(default: 'sigmoid')" in text and "(default: 'runs/dpo')" in text
    for short in ("--model", "--data", "--output-dir", "--max-steps", "--config", "--resume"):
        assert short in text


def test_cli_misspelled_flag_and_key_suggest(capsys):
    assert main(["dpo", "--max-step", "3"]) == 2
    assert "did you mean '--max-steps'" in capsys.readouterr().err
    assert main(["dpo", "trian.lr=1e-5"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_resolved_config_roundtrips(tmp_path: Path):
    from dpokit.config import save_config

    cfg = load_config(None, [("train.lr", 2e-6), ("data.train_files", ["x.jsonl"])])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again, Config)
