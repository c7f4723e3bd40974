"""tasks.yaml as an attacker or a slip of the keyboard writes it (issue 13, cases 14 and 16): non-finite or
negative weights, deeply nested YAML, non-UTF-8 bytes, a FIFO or a huge file: one line, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from catalog_tagger.config import MAX_TASKS_FILE_BYTES, load_tasks
from catalog_tagger.errors import ConfigError

GOOD = (
    "tasks:\n  - {name: color, kind: multiclass, labels: [red, green]%s}\n"
    "  - {name: badges, kind: multilabel, labels: [sale]%s}\n"
)


def _write(tmp_path, text: str | bytes, name: str = "tasks.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


@pytest.mark.parametrize("weight", [".inf", "-.inf", ".nan", ".NaN", "-1", "0", "1e999"])
def test_a_non_finite_or_non_positive_weight_is_refused_naming_task_and_field(tmp_path, weight):
    path = _write(tmp_path, GOOD % (f", weight: {weight}", ""))
    with pytest.raises(ConfigError, match=r"^tasks\.yaml: task 'color': field 'weight': ") as info:
        load_tasks(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("threshold", [".nan", ".inf", "1.5"])
def test_a_non_finite_threshold_is_refused(tmp_path, threshold):
    with pytest.raises(ConfigError, match=r"task 'badges': field 'threshold'"):
        load_tasks(_write(tmp_path, GOOD % ("", f", threshold: {threshold}")))


def test_finite_weights_still_load(tmp_path):
    cfg = load_tasks(_write(tmp_path, GOOD % (", weight: 2.5", ", threshold: 0.3")))
    assert cfg.task("color").weight == 2.5 and cfg.task("badges").threshold == 0.3


@pytest.mark.timeout(60)
def test_deeply_nested_yaml_is_one_line(tmp_path):
    path = _write(tmp_path, "tasks: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_tasks(path)


def test_non_utf8_yaml_names_the_byte(tmp_path):
    text = "tasks:\n  - {name: color, kind: multiclass, labels: [rouge, \xe9t\xe9]}\n"
    path = _write(tmp_path, text.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_tasks(path)


def test_invalid_yaml_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid YAML: .*\(line 2, column \d+\)$") as info:
        load_tasks(_write(tmp_path, "tasks:\n  - {name: a, kind: [}\n"))
    assert "\n" not in str(info.value)


@pytest.mark.timeout(30)
def test_a_fifo_or_device_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "tasks.yaml"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: it must not be opened
    for path in (str(fifo), "/dev/zero", str(tmp_path)):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_tasks(path)


def test_a_huge_file_is_refused_after_reading_the_bound_only(tmp_path):
    path = tmp_path / "tasks.yaml"
    with open(path, "wb") as fh:
        fh.truncate(MAX_TASKS_FILE_BYTES * 64)  # sparse: 64 MiB that would be parsed as YAML
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load_tasks(str(path))


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("tasks: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
        ("tasks:\n  - {name: color, kind: multiclass, labels: [a, b], weight: .inf}\n", "field 'weight'"),
        (b"\xff\xfe\x00t", "not UTF-8"),
    ],
)
def test_the_commands_exit_2_with_one_line(tmp_path, content, words):
    path = _write(tmp_path, content)
    r = subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", "init-model", "--tasks", path, "--out", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "m").exists()
