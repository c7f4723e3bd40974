"""The labels table: columns, unknown labels, CSV cells, relative uris, duplicates."""

from __future__ import annotations

import logging

import pytest

from catalog_tagger.errors import UserError
from catalog_tagger.train.labels import load_labels


def test_unknown_label_is_a_user_error_naming_it(tmp_path, three_tasks, write_labels):
    rows = [
        {"uri": "a.jpg", "shape": "square", "color": "red", "badges": ["sale"]},
        {"uri": "b.jpg", "shape": "hexagon", "color": "red", "badges": ["sale"]},
        {"uri": "c.jpg", "shape": "hexagon", "color": "teal", "badges": ["gift"]},
    ]
    labels = write_labels(tmp_path / "labels.parquet", rows)
    with pytest.raises(UserError) as exc:
        load_labels(labels, three_tasks)
    msg = str(exc.value)
    assert "shape='hexagon' (2 rows)" in msg
    assert "color='teal' (1 row)" in msg
    assert "badges='gift'" in msg


def test_missing_uri_column_is_a_user_error(tmp_path, three_tasks, write_labels):
    labels = write_labels(tmp_path / "labels.parquet", [{"path": "a.jpg", "shape": "square", "color": "red"}])
    with pytest.raises(UserError, match="no 'uri' column"):
        load_labels(labels, three_tasks)


def test_missing_task_column_is_a_user_error(tmp_path, three_tasks, write_labels):
    labels = write_labels(tmp_path / "labels.parquet", [{"uri": "a.jpg", "shape": "square", "color": "red"}])
    with pytest.raises(UserError, match=r"no column for task.*'badges'"):
        load_labels(labels, three_tasks)


def test_missing_or_unreadable_table_is_a_user_error(tmp_path, three_tasks):
    with pytest.raises(UserError, match=r"labels table .* not found"):
        load_labels(str(tmp_path / "nope.parquet"), three_tasks)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"labels table .* cannot be read"):
        load_labels(str(tmp_path / "junk.parquet"), three_tasks)


def test_csv_table_relative_uris_pipe_multilabel_and_missing(tmp_path, three_tasks):
    (tmp_path / "t.csv").write_text(
        "uri,shape,color,badges\nimg/a.jpg,square,red,sale|logo\n/abs/b.jpg,,green,[]\ns3://bkt/c.jpg,star,,\n"
    )
    table = load_labels(str(tmp_path / "t.csv"), three_tasks)
    assert table.uris == [str(tmp_path / "img" / "a.jpg"), "/abs/b.jpg", "s3://bkt/c.jpg"]
    assert table.targets["shape"].tolist() == [0, -1, 2]
    assert table.targets["color"].tolist() == [0, 1, -1]
    assert table.targets["badges"].tolist() == [[1, 1, 0], [0, 0, 0], [-1, -1, -1]]


def test_csv_cells_are_read_as_written(tmp_path):
    # A CSV reader that infers types would turn "01" into 1 and "true" into True: neither is a declared label.
    from catalog_tagger.config import parse_tasks

    tasks = parse_tasks({"tasks": [{"name": "code", "kind": "multiclass", "labels": ["01", "true", "1.50"]}]})
    (tmp_path / "t.csv").write_text("uri,code\na.jpg,01\nb.jpg,true\nc.jpg,1.50\n")
    assert load_labels(str(tmp_path / "t.csv"), tasks).targets["code"].tolist() == [0, 1, 2]
    (tmp_path / "t.tsv").write_text("uri\tcode\na.jpg\t01\nb.jpg\t\n")
    assert load_labels(str(tmp_path / "t.tsv"), tasks).targets["code"].tolist() == [0, -1]


def test_duplicate_uris_keep_the_first_row(tmp_path, three_tasks, write_labels, caplog):
    rows = [
        {"uri": "a.jpg", "shape": "square", "color": "red", "badges": []},
        {"uri": "b.jpg", "shape": "circle", "color": "red", "badges": []},
        {"uri": "a.jpg", "shape": "star", "color": "green", "badges": ["sale"]},
    ]
    labels = write_labels(tmp_path / "labels.parquet", rows)
    with caplog.at_level(logging.WARNING):
        table = load_labels(labels, three_tasks)
    assert [u.rsplit("/", 1)[-1] for u in table.uris] == ["a.jpg", "b.jpg"]
    assert table.targets["shape"].tolist() == [0, 1]
    assert "1 duplicate uri row(s) dropped" in caplog.text
