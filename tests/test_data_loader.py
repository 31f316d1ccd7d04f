"""load_datasets: file types x row formats, #N sampling, subsets, --columns, errors and skipping."""

import json
import logging
from collections import Counter

import datasets
import pandas as pd
import pytest

from swiftray.data.formats import DatasetFormatError
from swiftray.data.loader import load_datasets, parse_dataset_spec, split_train_val

datasets.disable_progress_bars()

SYSTEM = "You are terse."
TURNS = [("Capital of France?", "Paris."), ("And of Italy?", "Rome.")]
EXPECTED = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": TURNS[0][0]},
    {"role": "assistant", "content": TURNS[0][1]},
    {"role": "user", "content": TURNS[1][0]},
    {"role": "assistant", "content": TURNS[1][1]},
]


def conversation_as(fmt: str, i: int) -> dict:
    """Row i of a three-row dataset, the same conversation in each format; `solution` rides along."""
    sharegpt = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in EXPECTED
    ]
    rows = {
        "messages": {"messages": EXPECTED},
        "sharegpt": {"conversations": sharegpt},
        "query_response": {
            "system": SYSTEM,
            "history": [list(TURNS[0])],
            "query": TURNS[1][0],
            "response": TURNS[1][1],
        },
    }
    return {**rows[fmt], "solution": f"s{i}"}


def write(rows: list[dict], path, file_type: str) -> str:
    """Write rows as one file type; CSV holds list columns as JSON strings."""
    path = str(path)
    if file_type == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif file_type == "json":
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
    elif file_type == "csv":
        flat = [{k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()} for r in rows]
        pd.DataFrame(flat).to_csv(path, index=False)
    elif file_type == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:  # a save_to_disk folder
        datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


def jsonl(tmp_path, name: str, lines: list) -> str:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def qa_rows(n: int) -> list[dict]:
    return [{"query": f"q{i}", "response": f"r{i}", "idx": i} for i in range(n)]


@pytest.mark.parametrize("file_type", ["json", "jsonl", "csv", "parquet", "disk"])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "query_response"])
def test_each_file_type_and_format_loads_to_the_same_rows(tmp_path, fmt, file_type):
    ext = "" if file_type == "disk" else f".{file_type}"
    path = write([conversation_as(fmt, i) for i in range(3)], tmp_path / f"data{ext}", file_type)
    ds = load_datasets([path], shuffle=False)
    assert ds.column_names == ["messages", "solution"]
    assert ds["messages"] == [EXPECTED] * 3
    assert ds["solution"] == ["s0", "s1", "s2"]


def test_parse_dataset_spec():
    spec = parse_dataset_spec("swift/self-cognition:qwen3/empty_think#500")
    assert (spec.path, spec.subsets, spec.sample) == ("swift/self-cognition", ["qwen3", "empty_think"], 500)
    assert parse_dataset_spec("data/train.jsonl#20").path == "data/train.jsonl"
    assert parse_dataset_spec("folder:validation").subsets == ["validation"]
    with pytest.raises(ValueError, match="positive"):
        parse_dataset_spec("a.jsonl#0")


def test_sample_below_size_is_a_seeded_subset(tmp_path):
    path = write(qa_rows(50), tmp_path / "d.jsonl", "jsonl")
    a = load_datasets([f"{path}#20"], seed=1)["idx"]
    assert len(a) == 20 and len(set(a)) == 20  # no repeats
    assert load_datasets([f"{path}#20"], seed=1)["idx"] == a  # reproducible
    assert sorted(load_datasets([f"{path}#20"], seed=2)["idx"]) != sorted(a)
    assert load_datasets([f"{path}#5"], shuffle=False)["idx"] == [0, 1, 2, 3, 4]


def test_sample_above_size_repeats_then_adds_a_random_remainder(tmp_path):
    path = write(qa_rows(10), tmp_path / "d.jsonl", "jsonl")
    counts = Counter(load_datasets([f"{path}#25"], seed=3)["idx"])
    assert sum(counts.values()) == 25 and set(counts) == set(range(10))
    assert sorted(Counter(counts.values()).items()) == [(2, 5), (3, 5)]  # floor(25/10)=2 each, 5 once more
    assert Counter(load_datasets([f"{path}#30"])["idx"]) == Counter({i: 3 for i in range(10)})


def test_subset_picks_split_of_a_saved_dataset_dict(tmp_path):
    folder = str(tmp_path / "dd")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(qa_rows(4)),
            "validation": datasets.Dataset.from_list(qa_rows(2)),
        }
    ).save_to_disk(folder)
    assert len(load_datasets([folder])) == 4  # train by default
    assert len(load_datasets([f"{folder}:validation"])) == 2
    assert len(load_datasets([f"{folder}:train/validation"])) == 6
    with pytest.raises(ValueError, match=r"no split \['test'\]"):
        load_datasets([f"{folder}:test"])


def test_columns_remap_as_dict_and_json_string(tmp_path):
    path = jsonl(tmp_path, "d.jsonl", [{"ask": "2+2?", "reply": "4", "gold": "4"}])
    for columns in (
        {"ask": "query", "reply": "response", "gold": "solution"},
        '{"ask": "query", "reply": "response", "gold": "solution"}',
    ):
        ds = load_datasets([path], columns=columns)
        assert ds[0] == {
            "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "solution": "4",
        }


def test_datasets_with_different_extra_columns_concatenate(tmp_path):
    a = jsonl(tmp_path, "a.jsonl", [{"query": "a", "response": "b", "solution": "1"}])
    b = jsonl(tmp_path, "b.jsonl", [{"query": "c", "response": "d", "rejected_response": "x"}])
    ds = load_datasets([a, b], shuffle=False)
    assert ds["solution"] == ["1", None] and ds["rejected_response"] == [None, "x"]


def test_unknown_dataset_names_the_builtins():
    with pytest.raises(ValueError, match="swiftray/arithmetic"):
        load_datasets(["no/such-dataset"])


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = jsonl(tmp_path, "bad.jsonl", [{"query": "a", "response": "b"}, '{"query": "c", "response": }'])
    with pytest.raises(DatasetFormatError, match=r"bad\.jsonl line 2, field '<line>': malformed JSON"):
        load_datasets([path])
    broken = tmp_path / "bad.json"
    broken.write_text('[\n  {"query": "a", "response": "b"},\n  {"query": "c" "response": "d"}\n]\n')
    with pytest.raises(DatasetFormatError, match=r"bad\.json line 3, column \d+: malformed JSON"):
        load_datasets([str(broken)])


@pytest.mark.parametrize(
    "bad_row, field, words",
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            "messages[1].role",
            "unknown role 'bot'",
        ),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]},
            "messages[0].content",
            "empty content",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant turn"),
        ({"text": "a"}, "<columns>", "expected 'messages'"),
    ],
)
def test_bad_row_in_a_file_names_file_line_and_field(tmp_path, bad_row, field, words):
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = jsonl(tmp_path, "train.jsonl", [good, "", good, bad_row])  # a blank line: still line 4
    with pytest.raises(DatasetFormatError) as err:
        load_datasets([path])
    msg = str(err.value)
    assert f"{path} line 4" in msg and f"field '{field}'" in msg and words in msg


def test_bad_row_in_csv_names_row_index(tmp_path):
    path = write(
        [{"query": "a", "response": "b"}, {"query": "c", "response": None}], tmp_path / "t.csv", "csv"
    )
    with pytest.raises(DatasetFormatError, match=r"t\.csv row index 1, field 'response': no assistant turn"):
        load_datasets([path])
    assert len(load_datasets([path], allow_no_response=True)) == 2


def test_required_column_missing_names_dataset_row_and_column(tmp_path):
    path = jsonl(tmp_path, "rl.jsonl", [{"query": "a", "solution": "1"}, {"query": "b"}])
    assert len(load_datasets([path], allow_no_response=True)) == 2  # fine when no reward needs it
    with pytest.raises(DatasetFormatError) as err:
        load_datasets([path], allow_no_response=True, required_columns=["solution"])
    assert "rl.jsonl line 2" in str(err.value) and "missing required column 'solution'" in str(err.value)
    kept = load_datasets([path], allow_no_response=True, required_columns=["solution"], strict=False)
    assert kept["solution"] == ["1"]


def test_required_column_is_kept_even_when_a_format_reads_it(tmp_path):
    path = jsonl(tmp_path, "gsm.jsonl", [{"question": "1+1?", "answer": "2"}])
    ds = load_datasets([path], required_columns=["answer"])
    assert ds[0]["answer"] == "2" and ds[0]["messages"][-1] == {"role": "assistant", "content": "2"}


def test_not_strict_skips_bad_rows_and_logs_counts(tmp_path, caplog):
    ok = {"query": "q", "response": "r"}
    path = jsonl(
        tmp_path,
        "data.jsonl",
        [ok, {"query": "q"}, "{not json", {"query": "q", "response": " "}, ok, {"query": "q2"}],
    )
    with caplog.at_level(logging.WARNING, logger="swiftray"):
        ds = load_datasets([path], strict=False)
    assert len(ds) == 2
    assert "skipped 4 rows of" in caplog.text and "data.jsonl" in caplog.text
    assert "2 no assistant turn" in caplog.text and "1 empty content" in caplog.text
    assert "1 malformed JSON" in caplog.text
    # Each skipped row is named by its file and line, and the warning says how to make it an error.
    assert "data.jsonl line 3: malformed JSON" in caplog.text
    assert "data.jsonl line 2" in caplog.text and "--strict true" in caplog.text
    with pytest.raises(DatasetFormatError, match="all rows"):
        load_datasets([jsonl(tmp_path, "none.jsonl", [{"query": "q"}])], strict=False)


def test_errors_survive_worker_processes(tmp_path):
    rows = qa_rows(200)
    rows[150] = {"query": "q", "response": ""}
    path = write(rows, tmp_path / "big.jsonl", "jsonl")
    with pytest.raises(DatasetFormatError, match=r"big\.jsonl line 151, field 'response': empty content"):
        load_datasets([path], num_proc=2)


def test_split_train_val_is_disjoint_and_seeded(tmp_path):
    ds = load_datasets([write(qa_rows(40), tmp_path / "d.jsonl", "jsonl")], shuffle=False)
    train, val = split_train_val(ds, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36
    assert set(train["idx"]).isdisjoint(val["idx"])
    assert split_train_val(ds, 0.1, seed=0)[1]["idx"] == val["idx"]
    assert split_train_val(ds, 0.0, seed=0) == (ds, None)


def test_json_file_of_one_object_is_rejected_and_json_lines_in_json_accepted(tmp_path):
    pretty = tmp_path / "obj.json"
    pretty.write_text(json.dumps({"query": "a", "response": "b"}, indent=2))
    with pytest.raises(DatasetFormatError, match=r"obj\.json line 1.*expected a JSON list"):
        load_datasets([str(pretty)])
    lines = tmp_path / "lines.json"
    lines.write_text(
        json.dumps({"query": "a", "response": "b"}) + "\n" + json.dumps({"query": "c", "response": "d"})
    )
    assert len(load_datasets([str(lines)])) == 2
