import json
from pathlib import Path

import pytest

from dpokit.data.formats import DataError, load_preferences, load_sft, read_records, to_preference, to_sft

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- schemas
def test_explicit_string_prompt():
    ex = to_preference({"prompt": "Q?", "chosen": " yes", "rejected": " no"}, "f:line 1")
    assert (ex.prompt, ex.chosen, ex.rejected, ex.conversational) == ("Q?", " yes", " no", False)


def test_explicit_conversational_prompt_and_string_completions_become_messages():
    ex = to_preference({"prompt": [U("Hi")], "chosen": "Hello!", "rejected": "Go away."}, "f:line 1")
    assert ex.prompt == [U("Hi")] and ex.chosen == [A("Hello!")] and ex.rejected == [A("Go away.")]
    ex2 = to_preference({"prompt": "Hi", "chosen": [A("Hello!")], "rejected": [A("No.")]}, "f:line 1")
    assert ex2.prompt == [U("Hi")] and ex2.conversational


def test_implicit_string_prompt_takes_shared_prefix_at_word_boundary():
    ex = to_preference({"chosen": "The cat sat on the mat.", "rejected": "The car sat on the mat."}, "f:line 1")
    assert ex.prompt == "The " and ex.chosen == "cat sat on the mat." and ex.rejected == "car sat on the mat."
    ex = to_preference({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}, "f:line 1")
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q: 2+2? A: ", "4", "5")


def test_implicit_conversations_and_multi_turn():
    chosen = [U("a"), A("b"), U("c"), A("good")]
    rejected = [U("a"), A("b"), U("c"), A("bad")]
    ex = to_preference({"chosen": chosen, "rejected": rejected}, "f:line 1")
    assert ex.prompt == chosen[:3] and ex.chosen == [A("good")] and ex.rejected == [A("bad")]


def test_explicit_multi_turn_prompt():
    ex = to_preference({"prompt": [{"role": "system", "content": "Be kind."}, U("a"), A("b"), U("c")],
                        "chosen": [A("good")], "rejected": [A("bad")]}, "f:line 1")
    assert len(ex.prompt) == 4 and ex.chosen == [A("good")]


def test_anthropic_hh_transcripts():
    rec = {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: Who knows.",
    }
    ex = to_preference(rec, "hh:line 1")
    assert ex.prompt == [U("What is 2+2?"), A("4."), U("And 3+3?")]
    assert ex.chosen == [A("6.")] and ex.rejected == [A("Who knows.")]


def test_sft_schemas():
    assert to_sft({"prompt": "Q", "completion": " A"}, "w").completion == " A"
    ex = to_sft({"messages": [U("hi"), A("hello")]}, "w")
    assert ex.prompt == [U("hi")] and ex.completion == [A("hello")]
    ex = to_sft({"prompt": "Q", "chosen": " good", "rejected": " bad"}, "w")  # the paper's recipe
    assert ex.completion == " good"
    ex = to_sft({"prompt": [U("hi")], "completion": "hello"}, "w")
    assert ex.completion == [A("hello")]


# ------------------------------------------------------------------------- bad records
@pytest.mark.parametrize(
    "rec,message",
    [
        ({"prompt": "p", "rejected": "r"}, "field 'chosen' is missing"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen': expected a string or a list of messages, got int"),
        ({"prompt": "p", "chosen": "c", "rejected": "  "}, "field 'rejected' is empty or whitespace only"),
        ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": "c", "rejected": "r"},
         r"field 'prompt\[0\].role': unknown role 'wizard'"),
        ({"prompt": [{"role": "user", "content": ["x"]}], "chosen": "c", "rejected": "r"},
         r"field 'prompt\[0\].content': expected a string, got list"),
        ({"prompt": [U("x"), "oops"], "chosen": "c", "rejected": "r"}, r"field 'prompt\[1\]': expected a message object"),
        ({"chosen": [U("a"), A("b")], "rejected": [U("z"), A("c")]}, "differ before their final assistant turn"),
        ({"chosen": [U("a"), U("b")], "rejected": [U("a"), A("c")]}, "last message must be an assistant turn"),
        ({"chosen": "abc", "rejected": "xyz"}, "share no prefix"),
        ({"chosen": [U("a"), A("b")], "rejected": "a b"}, "one is a conversation and the other a string"),
        (["not", "a", "dict"], "expected an object with 'chosen' and 'rejected', got list"),
    ],
)
def test_bad_preference_records_name_location_and_field(rec, message):
    with pytest.raises(DataError, match=message) as e:
        to_preference(rec, "data.jsonl:line 7")
    assert str(e.value).startswith("data.jsonl:line 7:")


@pytest.mark.parametrize(
    "rec,message",
    [
        ({"text": "hello"}, "unknown SFT schema with fields \\['text'\\]"),
        ({"messages": [U("hi")]}, "last message must be an assistant turn"),
        ({"prompt": "Q", "completion": ""}, "field 'completion' is empty"),
        ({"prompt": "Q", "completion": [U("x")]}, "expected one assistant message"),
    ],
)
def test_bad_sft_records(rec, message):
    with pytest.raises(DataError, match=message):
        to_sft(rec, "sft.jsonl:line 2")


def test_bad_json_line_names_file_and_line(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, "", "{oops"])
    with pytest.raises(DataError, match=r"d.jsonl:line 3: not valid JSON"):
        load_preferences([str(path)])


def test_first_bad_record_stops_loading_with_its_line(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                              {"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl:line 2: field 'rejected' is missing"):
        load_preferences([str(path)])


# --------------------------------------------------------------------------- file types
ROWS = [{"prompt": "p1", "chosen": " c1", "rejected": " r1"}, {"prompt": "p2", "chosen": " c2", "rejected": " r2"}]


def test_jsonl_json_csv_parquet_and_saved_dataset_agree(tmp_path: Path):
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [write_jsonl(tmp_path / "a.jsonl", ROWS)]
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    with (tmp_path / "a.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved_dict"))
    paths += [tmp_path / n for n in ("a.json", "b.json", "a.csv", "a.parquet", "saved", "saved_dict")]
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]
    for p in paths:
        got = [(e.prompt, e.chosen, e.rejected) for e in load_preferences([str(p)])]
        assert got == expected, p


def test_locations_per_format(tmp_path: Path):
    import csv

    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    with (tmp_path / "a.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(ROWS)
    assert [loc for loc, _ in read_records(str(tmp_path / "a.json"))][1].endswith("a.json:record 1")
    assert [loc for loc, _ in read_records(str(tmp_path / "a.csv"))][1].endswith("a.csv:line 3")


def test_missing_split_and_missing_file_and_offline_hub(tmp_path: Path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="no split 'test'"):
        load_preferences([str(tmp_path / "dd")], split="test")
    with pytest.raises(DataError, match="no such file"):
        load_preferences([str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        load_preferences([str(tmp_path / "x.txt")])
    with pytest.raises(DataError, match="not a local file or folder, and loading it as a hub dataset failed"):
        load_preferences(["some-org/some-preference-set"])


def test_sft_loader_reads_messages_file(tmp_path: Path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [U("hi"), A("hello")]}, {"prompt": "a", "completion": "b"}])
    out = load_sft([str(path)])
    assert len(out) == 2 and out[0].conversational and not out[1].conversational
