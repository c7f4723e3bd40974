"""tasks.yaml validation: every bad case is refused with the file, the task and the field named."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from catalog_tagger.config import load_tasks, parse_tasks
from catalog_tagger.errors import ConfigError

GOOD = {
    "tasks": [
        {"name": "color", "kind": "multiclass", "labels": ["red", "green", "blue"]},
        {"name": "badges", "kind": "multilabel", "labels": ["sale", "logo"], "threshold": 0.4, "weight": 2.0},
    ]
}


def _write(tmp_path, data) -> str:
    p = tmp_path / "tasks.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_good_config_loads_with_defaults(tmp_path):
    cfg = load_tasks(_write(tmp_path, GOOD))
    assert cfg.names == ["color", "badges"]
    assert cfg.task("color").weight == 1.0
    assert cfg.task("color").threshold is None
    assert cfg.task("badges").effective_threshold == 0.4
    assert cfg.task("badges").weight == 2.0
    # round trip through YAML is lossless
    assert parse_tasks(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize(
    ("task", "field", "needle"),
    [
        ({"name": "color", "kind": "ordinal", "labels": ["a", "b"]}, "kind", "multiclass"),
        ({"name": "color", "kind": "multiclass", "labels": ["only"]}, "labels", "at least 2 labels"),
        ({"name": "color", "kind": "multiclass", "labels": ["red", "red"]}, "labels", "duplicate label 'red'"),
        ({"name": "Color-1", "kind": "multiclass", "labels": ["a", "b"]}, "name", "not a valid column name"),
        ({"name": "uri", "kind": "multiclass", "labels": ["a", "b"]}, "name", "reserved"),
        ({"name": "color", "kind": "multilabel", "labels": ["a"], "threshold": 1.5}, "threshold", "outside (0, 1)"),
        ({"name": "color", "kind": "multilabel", "labels": ["a"], "threshold": 0.0}, "threshold", "outside (0, 1)"),
        (
            {"name": "color", "kind": "multiclass", "labels": ["a", "b"], "threshold": 0.3},
            "threshold",
            "only multilabel",
        ),
        ({"name": "color", "kind": "multiclass", "labels": ["a", "b"], "weight": -1}, "weight", "greater than 0"),
        ({"name": "color", "kind": "multiclass", "labels": ["a", "b"], "colour": 1}, "colour", "Extra inputs"),
    ],
)
def test_bad_task_is_refused_naming_file_task_and_field(tmp_path, task, field, needle):
    path = _write(tmp_path, {"tasks": [task]})
    with pytest.raises(ConfigError) as exc:
        load_tasks(path)
    msg = str(exc.value)
    assert msg.startswith("tasks.yaml: ")
    assert f"field {field!r}" in msg
    assert needle in msg
    assert f"task {task['name']!r}" in msg


def test_duplicate_task_names_refused(tmp_path):
    data = {"tasks": [GOOD["tasks"][0], dict(GOOD["tasks"][0])]}
    with pytest.raises(ConfigError, match="duplicate task name 'color'"):
        load_tasks(_write(tmp_path, data))


def test_score_column_clash_refused():
    data = {
        "tasks": [
            {"name": "color", "kind": "multiclass", "labels": ["a", "b"]},
            {"name": "color_score", "kind": "multiclass", "labels": ["a", "b"]},
        ]
    }
    with pytest.raises(ConfigError, match="clashes"):
        parse_tasks(data, source="x.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_tasks(tmp_path / "nope.yaml")
    bad = tmp_path / "tasks.yaml"
    bad.write_text("tasks: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_tasks(bad)
    bad.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_tasks(bad)


def test_cli_exits_2_on_bad_config(tmp_path):
    path = _write(tmp_path, {"tasks": [{"name": "color", "kind": "multiclass", "labels": ["red", "red"]}]})
    proc = subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", "init-model", "--tasks", path, "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "duplicate label 'red'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()
