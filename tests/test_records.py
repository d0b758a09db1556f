"""Records and sources: the schema, JSON Lines / JSON lists / Parquet / hub folders, field
mapping, and every kind of bad input named by file and line (or skipped and reported)."""

from __future__ import annotations

import json
import re

import pytest

from tinyllm_jax.config import ConfigError, DataConfig
from tinyllm_jax.data.records import RecordError, iter_records, make_record, read_jsonl, write_jsonl
from tinyllm_jax.data.sources import load_records, load_split
from tinyllm_jax.errors import UserError


def rows(n: int = 3) -> list[dict]:
    return [make_record(f"r{i}", f"question {i}?", "yes", ["yes", "no"],
                        rationales={"gpt": [f"because {i}", ""], "llama": [" "]}) for i in range(n)]


def write_lines(path, lines: list[str | bytes]) -> None:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")


def test_make_record_drops_empty_rationales_and_round_trips(tmp_path):
    recs = rows(2)
    assert recs[0]["rationales"] == {"gpt": ["because 0"]}  # "" and " " never become targets
    assert write_jsonl(tmp_path / "r.jsonl", recs) == 2
    back, skipped = read_jsonl(tmp_path / "r.jsonl")
    assert back == recs and skipped == []


def test_json_list_file_is_read_and_rows_are_located_by_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps(rows(2), indent=2))
    assert [r["id"] for r in iter_records(path)] == ["r0", "r1"]
    data = rows(2)
    del data[1]["answer"]
    path.write_text(json.dumps(data, indent=2))
    starts = [n for n, text in enumerate(json.dumps(data, indent=2).splitlines(), 1) if text == "  {"]
    line = starts[1]  # where row 2 starts
    with pytest.raises(RecordError, match=rf"list.json:{line}: missing required field 'answer'"):
        list(iter_records(path))


def test_malformed_json_names_file_and_line_or_is_skipped_when_lenient(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = [json.dumps(r) for r in rows(3)]
    write_lines(path, [good[0], '{"id": "x", "question": ', good[1], "", good[2]])
    with pytest.raises(RecordError, match=r"bad.jsonl:2: malformed JSON"):
        list(iter_records(path))
    skipped: list[str] = []
    recs = list(iter_records(path, lenient=True, skipped=skipped))
    assert [r["id"] for r in recs] == ["r0", "r1", "r2"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{path}:2: malformed JSON")


def test_missing_required_field_is_an_error_naming_the_field(tmp_path):
    path = tmp_path / "r.jsonl"
    write_lines(path, [json.dumps(rows(1)[0]), json.dumps({"id": "q", "answer": "a"})])
    with pytest.raises(RecordError, match=r"r.jsonl:2: missing required field 'question'"):
        load_records(path)
    recs, skipped = load_records(path, lenient=True)
    assert [r["id"] for r in recs] == ["r0"] and "missing required field 'question'" in skipped[0]


def test_numeric_answers_are_their_decimal_text_and_booleans_are_named(tmp_path):
    """SVAMP writes 13.0, GSM8K-style files 72: numbers are the answer's text; true/false are
    refused with what to write instead (a yes/no task's answers are words)."""
    path = tmp_path / "r.jsonl"
    write_lines(path, [json.dumps({"id": i, "question": "q?", "answer": a}) for i, a in enumerate([13.0, 72, 2.5, -4])])
    assert [r["answer"] for r in load_records(path)[0]] == ["13", "72", "2.5", "-4"]
    for bad, said in [(True, 'found true (write "yes" or "no"'), (None, "expected a string or a number, found None"),
                      ([1], "expected a string or a number, found [1]")]:
        write_lines(path, [json.dumps({"id": "a", "question": "q?", "answer": "1"}),
                           json.dumps({"id": "b", "question": "q?", "answer": bad})])
        with pytest.raises(RecordError, match=r"r.jsonl:2: field 'answer': .*" + re.escape(said)):
            load_records(path)


def test_non_utf8_row_is_named_and_only_that_row_is_skipped(tmp_path):
    path = tmp_path / "latin1.jsonl"
    bad = json.dumps({"id": "b", "question": "caf\u00e9", "answer": "x"}, ensure_ascii=False).encode("latin-1")
    write_lines(path, [json.dumps(rows(1)[0]), bad, json.dumps(rows(2)[1])])
    with pytest.raises(RecordError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9\)"):
        load_records(path)
    recs, skipped = load_records(path, lenient=True)
    assert [r["id"] for r in recs] == ["r0", "r1"]
    assert skipped == [f"{path}:2: not valid UTF-8 (byte 0xe9)"]


@pytest.mark.parametrize("encoding, newline", [("utf-8-sig", "\r\n"), ("utf-16", "\r\n"), ("utf-16-be", "\n")])
def test_windows_files_read_as_written_there(tmp_path, encoding, newline):
    """Notepad's UTF-8 with a byte-order mark and CRLF lines, PowerShell's UTF-16 (`>`), as
    JSON Lines and as a JSON list: the same records as plain UTF-8."""
    want = rows(2)
    bom = "\ufeff" if encoding == "utf-16-be" else ""  # "utf-16" writes its own mark
    for name, text in [("lines.jsonl", newline.join(json.dumps(r, ensure_ascii=False) for r in want) + newline),
                       ("list.json", json.dumps(want, indent=1).replace("\n", newline))]:
        path = tmp_path / name
        path.write_bytes((bom + text).encode(encoding))
        recs, skipped = load_records(path)
        assert recs == [json.loads(json.dumps(r)) for r in want] and skipped == [], name


def test_broken_utf16_is_named(tmp_path):
    path = tmp_path / "half.jsonl"
    path.write_bytes("\ufeff{}".encode("utf-16-le") + b"\x00\xd8")  # a lone high surrogate at the end
    with pytest.raises(RecordError, match=r"half.jsonl: UTF-16 \(by its byte-order mark\) but not valid UTF-16"):
        load_records(path)


def test_non_utf8_inside_a_json_list_is_located_too(tmp_path):
    path = tmp_path / "list.json"
    text = json.dumps(rows(2), indent=1).replace("question 1?", "QQQ").encode()
    path.write_bytes(text.replace(b"QQQ", b"\xff question"))
    recs, skipped = load_records(path, lenient=True)
    assert [r["id"] for r in recs] == ["r0"] and "not valid UTF-8 (byte 0xff)" in skipped[0]


def test_empty_file_is_an_error_and_lenient_reports_it(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(RecordError, match=r"empty.json: empty file"):
        load_records(empty)
    good = tmp_path / "good.jsonl"
    write_jsonl(good, rows(2))
    recs, skipped = load_records([empty, good], lenient=True)
    assert len(recs) == 2 and skipped == [f"{empty}: empty file: no records"]
    with pytest.raises(RecordError, match="no records"):  # lenient never returns nothing
        load_records(empty, lenient=True)


def test_broken_json_list_cannot_be_skipped(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"id": "a", "question": "q", "answer": "x"},\n{"id": "b", "question": \n')
    with pytest.raises(RecordError, match=r"broken.json:\d+: malformed JSON.*even with lenient"):
        load_records(path, lenient=True)


def test_field_mapping_renames_source_columns_including_teachers(tmp_path):
    path = tmp_path / "src.jsonl"
    write_lines(path, [json.dumps({"uid": 7, "input": "2+2?", "label": "4", "gpt_why": "two and two"})])
    fields = {"id": "uid", "question": "input", "answer": "label", "rationales.gpt": "gpt_why"}
    (rec,), _ = load_records(path, fields=fields)
    assert rec["id"] == "7" and rec["question"] == "2+2?" and rec["answer"] == "4"
    assert rec["rationales"] == {"gpt": ["two and two"]} and "input" not in rec
    with pytest.raises(RecordError, match=r"src.jsonl:1: missing field 'query' \(mapped to 'question' by data.fields\)"):
        load_records(path, fields={"id": "uid", "question": "query", "answer": "label"})


def test_duplicate_ids_across_files_are_reported_with_both_places(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, rows(2))
    write_jsonl(b, rows(1))
    with pytest.raises(RecordError, match=rf"b.jsonl:1: duplicate id 'r0' \(first seen at {a}:1\)"):
        load_records(str(tmp_path / "*.jsonl"))
    recs, skipped = load_records([a, b], lenient=True)
    assert len(recs) == 2 and len(skipped) == 1


def test_parquet_and_hub_folder_go_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p1", "p2"], "q": ["a?", "b?"], "answer": ["x", "y"],
                             "choices": [["x", "z"], ["y", "z"]]}), tmp_path / "d.parquet")
    recs, _ = load_records(tmp_path / "d.parquet", fields={"question": "q"})
    assert [(r["id"], r["question"], r["choices"]) for r in recs] == [("p1", "a?", ["x", "z"]), ("p2", "b?", ["y", "z"])]

    folder = tmp_path / "hubds"
    folder.mkdir()
    write_lines(folder / "train.jsonl", [json.dumps({"id": "h1", "text": "q?", "answer": "a"}),
                                         json.dumps({"id": "h2", "answer": "b", "text": None})])
    with pytest.raises(RecordError, match=r"hubds \[train\] row 2: field 'question'"):
        load_records(str(folder), source="hf", fields={"question": "text"})
    recs, skipped = load_records(str(folder), source="hf", fields={"question": "text"}, lenient=True)
    assert [r["id"] for r in recs] == ["h1"] and len(skipped) == 1


def test_tfds_missing_is_a_clear_error():
    try:
        import tensorflow_datasets  # noqa: F401
        pytest.skip("tensorflow_datasets is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match=r"pip install 'tinyllm-jax\[tfds\]'"):
        load_records("mnist", source="tfds")


def test_load_split_reads_the_config(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", rows(2))
    recs, _ = load_split(DataConfig(train=[str(tmp_path / "t.jsonl")]), "train")
    assert len(recs) == 2
    with pytest.raises(ConfigError, match=r"data.validation: nothing given"):
        load_split(DataConfig(), "validation")
    with pytest.raises(ConfigError, match=r"data.hf_name: required"):
        load_split(DataConfig(source="hf", train=["train"]), "train")
