"""Untrusted data files: every bad input is one clean error line naming file, record and field.

The named cases (tests/bad_inputs.py ``BAD``) each say which kind of error and what the message
must say; the properties feed random files (random bytes, random JSON records, CSV and Parquet of
random shapes, each sometimes damaged) through every entry point and accept only a load or a clean
error. ``python benchmarks/fuzz_inputs.py`` runs the same properties on many more files.
"""

import json
from pathlib import Path

import pytest
from bad_inputs import BAD, GOOD, Bad, any_file, outcome
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_options import covers

from dpokit.cli import main
from dpokit.data.formats import DataError, SkipReport, is_prompt_like, load_preferences, to_preference


@pytest.mark.parametrize("case", BAD, ids=[b.name for b in BAD])
def test_each_bad_input_is_one_clean_error(case: Bad, tmp_path: Path):
    path = tmp_path / case.file
    case.build(path)
    result = outcome(path, case.max_chars)
    assert result.error is not None, f"{case.name}: loaded {result.examples} examples"
    assert result.error.kind == case.kind, (case.name, str(result.error))
    assert case.says in str(result.error), (case.name, str(result.error))
    assert not result.doctor_ok


def test_the_table_covers_every_reader_and_kind():
    suffixes = {Path(b.file).suffix for b in BAD}
    assert {".jsonl", ".json", ".csv", ".parquet", ""} <= suffixes
    kinds = {b.kind for b in BAD}
    assert kinds >= set(DataError.KINDS) - {"empty_response", "chosen_equals_rejected", "unknown_schema"}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(file=any_file)
def test_any_file_loads_or_gives_a_clean_error(tmp_path_factory, tokenizer, file):
    suffix, raw = file
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(raw)
    outcome(path, tokenizer=tokenizer)


def test_training_cli_gives_the_same_one_line_error(tmp_path: Path, tiny_model_dir: Path, capsys):
    for case in [b for b in BAD if b.name in ("empty jsonl", "misspelled prompt (promt)", "extra csv cells")]:
        path = tmp_path / f"{case.name.split()[0]}{Path(case.file).suffix}"
        case.build(path)
        rc = main(["dpo", "--model", str(tiny_model_dir), "--data", str(path), "--output-dir", str(tmp_path / "run"),
                   "--max-steps", "1", "precision=fp32"])
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if " INFO " not in ln]  # progress lines
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"dpokit: error: {path}"), err
        assert case.says in err[0]


# ----------------------------------------------------------------------------- prompts never invented
@pytest.mark.parametrize("name", ["promt", "prompts", "Prompt", " prompt", "PROMPT:", "\ufeffprompt", "propmt",
                                  "prompr", "system_prompt", "prompt_text", "question", "Questions", "instruction",
                                  "input", "query", "context", "history", "system", "user", "dialogue"])
def test_prompt_like_names(name):
    assert is_prompt_like(name)
    rec = {name: "Q: ", "chosen": "Q: yes", "rejected": "Q: no"}
    with pytest.raises(DataError, match="looks like a prompt") as e:
        to_preference(rec, "f:line 1")
    assert e.value.kind == "missing_field"


@pytest.mark.parametrize("name", ["prompt_id", "question_ids", "id", "score_chosen", "source", "chosen_score",
                                  "metadata", "label", "text", "category", "", "pr", "answer"])
def test_names_that_are_not_prompts(name):
    assert not is_prompt_like(name)
    ex = to_preference({name: "x", "chosen": "Q: yes", "rejected": "Q: no"}, "f:line 1")
    assert ex.prompt == "Q: "  # no prompt-like field: the shared start is the prompt, as documented


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=12), value=st.none() | st.text(max_size=5) | st.integers())
def test_a_prompt_is_taken_from_the_completions_only_when_nothing_else_could_be_it(name, value):
    """The implicit prompt is used only for a record with no 'prompt' key and no prompt-like field."""
    rec = {name: value, "chosen": "Q: yes", "rejected": "Q: no"}
    try:
        ex = to_preference(rec, "f:line 1")
    except DataError as e:
        assert name == "prompt" or is_prompt_like(name), str(e)
        assert e.kind in ("missing_field", "wrong_type", "empty_response", "chosen_equals_rejected")
        return
    if name == "prompt":
        assert ex.prompt == value
    else:
        assert not is_prompt_like(name) and ex.prompt == "Q: "


def test_csv_with_a_byte_order_mark_reads_the_prompt(tmp_path: Path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\nQ: ,Q: yes,Q: no\n")
    assert [(e.prompt, e.chosen) for e in load_preferences([str(path)])] == [("Q: ", "Q: yes")]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\n")
    assert load_preferences([str(jsonl)])[0].prompt == GOOD[0]["prompt"]


def test_the_doctor_names_and_counts_ignored_fields(tmp_path: Path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({**r, "id": i, "source": "web"}) + "\n" for i, r in enumerate(GOOD * 3)))
    assert main(["data", "check", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown_fields"] == {"id": 6, "source": 6}
    assert main(["data", "check", str(path)]) == 0
    assert "fields no schema reads (ignored): 'id' 6, 'source' 6" in capsys.readouterr().out


def test_one_unreadable_file_does_not_stop_the_doctor(tmp_path: Path):
    from dpokit.data.check import check_files

    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    empty.write_text("")
    report = check_files([str(empty), str(good)])
    assert report.records == 2 and report.usable == 2 and report.unreadable_files == 1 and not report.ok


def test_skipping_every_record_is_an_error_not_an_empty_run(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p"}\n{oops\n')
    skipped = SkipReport()
    with pytest.raises(DataError, match=r"bad.jsonl: no usable records \(2 skipped") as e:
        load_preferences([str(path)], skipped=skipped)
    assert e.value.kind == "no_records"


# ----------------------------------------------------------------------------------- record size
def test_the_size_limit_is_per_field_and_configurable(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p" * 300, "chosen": " c" * 100, "rejected": " r"}) + "\n")
    assert len(load_preferences([str(path)])) == 1  # 300 characters: far below the default limit
    for limit, ok in ((300, True), (299, False)):
        if ok:
            assert len(load_preferences([str(path)], max_chars=limit)) == 1
        else:
            with pytest.raises(DataError, match="field 'prompt' holds more than 299 characters") as e:
                load_preferences([str(path)], max_chars=limit)
            assert e.value.kind == "too_large"


def test_an_overlong_jsonl_line_is_skipped_unread_and_the_next_line_is_read(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({**GOOD[0], "pad": "x" * 5000}) + "\n" + json.dumps(GOOD[1]) + "\n")
    skipped = SkipReport()
    out = load_preferences([str(path)], skipped=skipped, max_chars=100)  # lines up to 3,200 bytes
    assert [e.prompt for e in out] == [GOOD[1]["prompt"]]
    assert skipped.by_kind == {"too_large": 1} and "line 1: the line is longer than 3,200 bytes" in skipped.first[0]


@covers("data.max_field_chars")
def test_training_refuses_or_skips_records_over_data_max_field_chars(tmp_path, tiny_model_dir):
    from dpokit.config import load_config
    from dpokit.train.dpo import run_dpo

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD * 2)
                    + json.dumps({"prompt": "p", "chosen": " long" * 40, "rejected": " r"}) + "\n")

    def run(name, *over):
        cfg = load_config(None, [("model.name_or_path", str(tiny_model_dir)), ("data.train_files", [str(path)]),
                                 ("output_dir", str(tmp_path / name)), ("train.max_steps", 1),
                                 ("train.batch_size", 2), ("precision", "fp32"), *over])
        run_dpo(cfg)
        return json.loads((tmp_path / name / "data_report.json").read_text())

    assert run("default")["train"]["kept"] == 5
    with pytest.raises(DataError, match="line 5: field 'chosen' holds more than 100 characters"):
        run("small", ("data.max_field_chars", 100))
    report = run("skip", ("data.max_field_chars", 100), ("data.skip_bad_records", True))
    assert report["train_skipped_records"]["by_kind"] == {"too_large": 1} and report["train"]["kept"] == 4
