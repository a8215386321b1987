"""`kiln data prepare` inputs: every format, directories and globs, record-aligned chunks."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kiln.data.pack import iter_documents
from kiln.data.prepare.config import InputConfig
from kiln.data.prepare.inputs import expand_inputs, plan_chunks, read_chunk
from kiln.errors import KilnDataError

DOCS = [f"document {i}\nline two of {i}, with \u2028 a separator" for i in range(40)]


def read_all(paths, cfg):
    return [d for c in plan_chunks(expand_inputs(paths), cfg) for d in read_chunk(c, cfg)]


def jsonl(docs, field="text"):
    return "".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))


def test_jsonl_plain_gz_zst_and_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(jsonl(DOCS[10:20]), encoding="utf-8")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(jsonl(DOCS[:10]))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS[20:30]).encode()))
    cfg = InputConfig()
    # Sorted paths decide the order, not the order of the arguments.
    got = read_all([str(tmp_path / "c.jsonl.zst"), str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl.gz")], cfg)
    assert got == DOCS[:30]


def test_text_field_is_configurable_and_missing_field_is_clear(tmp_path):
    (tmp_path / "a.jsonl").write_text(jsonl(DOCS[:3], field="content"))
    assert read_all([str(tmp_path)], InputConfig(text_field="content")) == DOCS[:3]
    with pytest.raises(KilnDataError, match=r"no field 'text'.*input.text_field"):
        read_all([str(tmp_path)], InputConfig())


def test_parquet_row_groups(tmp_path):
    table = pa.table({"body": DOCS, "n": list(range(len(DOCS)))})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=7)
    cfg = InputConfig(text_field="body", chunk_bytes=1024)
    chunks = plan_chunks(expand_inputs([str(tmp_path / "x.parquet")]), cfg)
    assert len(chunks) > 1
    assert read_all([str(tmp_path / "x.parquet")], cfg) == DOCS
    with pytest.raises(KilnDataError, match="no column 'text'"):
        read_all([str(tmp_path / "x.parquet")], InputConfig())


def test_text_blocks_and_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("first block\nstill first\n\n\n  \nsecond block\n")
    (tmp_path / "b.txt").write_text("one file\n\nwith a blank line\n")
    (tmp_path / "ignored.csv").write_text("not read")
    assert read_all([str(tmp_path)], InputConfig()) == [
        "one file", "with a blank line", "first block\nstill first", "second block"]  # b.txt < sub/a.txt
    assert read_all([str(tmp_path)], InputConfig(text_mode="file")) == [
        "one file\n\nwith a blank line\n", "first block\nstill first\n\n\n  \nsecond block\n"]


def test_globs_directories_and_errors(tmp_path):
    for name in ("x1.jsonl", "x2.jsonl", "y.jsonl"):
        (tmp_path / name).write_text(jsonl([name]))
    assert read_all([str(tmp_path / "x*.jsonl")], InputConfig()) == ["x1.jsonl", "x2.jsonl"]
    with pytest.raises(KilnDataError, match="matches no file"):
        expand_inputs([str(tmp_path / "z*.jsonl")])
    with pytest.raises(KilnDataError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(KilnDataError, match="unknown file type"):
        expand_inputs([str(tmp_path / "data.csv")])


@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_chunks_split_at_records_and_lose_nothing(tmp_path, kind):
    docs = [f"doc {i} " + "word " * (i % 37) for i in range(500)]
    path = tmp_path / f"big.{kind}"
    if kind == "jsonl":
        path.write_text(jsonl(docs))
    else:
        path.write_text("\n\n".join(d.replace("word word", "word\nword") for d in docs) + "\n")
    cfg = InputConfig(chunk_bytes=1024)
    chunks = plan_chunks([str(path)], cfg)
    assert len(chunks) > 10
    assert [c.start for c in chunks[1:]] == [c.end for c in chunks[:-1]]
    expected = docs if kind == "jsonl" else list(iter_documents([str(path)]))
    assert read_all([str(path)], cfg) == expected
