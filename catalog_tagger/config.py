"""Task config (``tasks.yaml``): the tasks one multi-head model predicts, validated before any work."""

from __future__ import annotations

import contextlib
import keyword
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from catalog_tagger.errors import ConfigError
from catalog_tagger.kinds import KINDS

TaskKind = Literal["multiclass", "multilabel", "regression"]
RegressionLoss = Literal["huber", "mse"]

# Output columns every row has; a task may not shadow them (``<task>_score`` suffixes included).
RESERVED_COLUMNS = frozenset(
    {
        "uri",
        "size",
        "etag",
        "mtime",
        "content_hash",
        "run_id",
        "model_version",
        "status",
        "error",
        "width",
        "height",
        "embedding",
        "tagged_at",
        "run_date",
    }
)
_COLUMN_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# A tasks file is a few kilobytes; the bound keeps a wrong path (a dataset, /dev/zero) from filling memory.
MAX_TASKS_FILE_BYTES = 1 << 20


class TaskSpec(BaseModel):
    """One task: a head of the model and one (or two) output columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # column name in the output: lowercase letters, digits, underscores
    kind: TaskKind  # multiclass: softmax, one label; multilabel: sigmoid, any subset of labels; regression: a number
    labels: tuple[str, ...] = ()  # label strings, in head-output order (a regression task has none)
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # loss weight in the joint training objective
    threshold: float | None = Field(default=None, allow_inf_nan=False)  # multilabel only: in (0, 1)
    # regression only: [lo, hi] of the target, mapped to [0, 1] for training and back for outputs (absent: as is).
    # Left out of dumps when unset, so the cards of the other kinds (and their version hashes) stay as they were.
    range: tuple[float, float] | None = Field(default=None, exclude_if=lambda v: v is None)
    loss: RegressionLoss | None = Field(default=None, exclude_if=lambda v: v is None)  # regression only: huber

    @field_validator("name")
    @classmethod
    def _valid_column(cls, v: str) -> str:
        if not _COLUMN_RE.match(v) or keyword.iskeyword(v):
            raise ValueError(
                f"{v!r} is not a valid column name (use lowercase letters, digits and '_', starting with a letter)"
            )
        if v in RESERVED_COLUMNS:
            raise ValueError(f"{v!r} is a reserved output column; pick another name")
        return v

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not isinstance(x, str) or not x.strip() for x in v):
            raise ValueError("labels must be non-empty strings")
        seen: set[str] = set()
        for label in v:
            if label in seen:
                raise ValueError(f"duplicate label {label!r}")
            seen.add(label)
        return v

    @model_validator(mode="after")
    def _kind_rules(self) -> TaskSpec:
        KINDS[self.kind].check(self)
        return self

    @property
    def effective_threshold(self) -> float:
        return 0.5 if self.threshold is None else self.threshold

    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


class TaskConfig(BaseModel):
    """The whole file: an ordered list of tasks with unique names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[TaskSpec, ...]

    @model_validator(mode="after")
    def _names_unique(self) -> TaskConfig:
        if not self.tasks:
            raise ValueError("tasks: at least one task is required")
        names = [t.name for t in self.tasks]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"tasks: duplicate task name {name!r}")
        taken = {t.name for t in self.tasks}
        for t in self.tasks:
            for suffix in ("_score", "_scores"):
                if f"{t.name}{suffix}" in taken:
                    raise ValueError(f"tasks: task {t.name + suffix!r} clashes with the score column of {t.name!r}")
        return self

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [t.model_dump(exclude_none=True, mode="json") for t in self.tasks]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class _Where:
    source: str


def _format_validation_error(err: ValidationError, data: Any, where: _Where) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        task_part = ""
        field = ".".join(str(x) for x in loc)
        if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
            idx = loc[1]
            name = None
            with contextlib.suppress(KeyError, IndexError, TypeError, AttributeError):
                name = data["tasks"][idx].get("name")
            task_part = f"task {name!r}" if name else f"task #{idx + 1}"
            field = ".".join(str(x) for x in loc[2:]) or "(task)"
        msg = e["msg"].removeprefix("Value error, ")
        # Cross-field checks report "<field>: <reason>": lift the field name out of the message.
        m = re.match(r"^(\w+): (.*)$", msg, re.S)
        if m and field in ("(task)", ""):
            field, msg = m.group(1), m.group(2)
        parts = [where.source]
        if task_part:
            parts.append(task_part)
        lines.append(f"{': '.join(parts)}: field {field!r}: {msg}")
    return "\n".join(lines)


def parse_tasks(data: Any, *, source: str = "<tasks>") -> TaskConfig:
    """Validate an already-parsed mapping (or a bare list of tasks)."""
    if isinstance(data, list):
        data = {"tasks": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'tasks' list, got {type(data).__name__}")
    try:
        return TaskConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, data, _Where(source))) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where (its own message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_tasks(uri: str | Path) -> TaskConfig:
    """Read and validate ``tasks.yaml`` from a local path or any fsspec URL (UTF-8, at most 1 MiB)."""
    uri = str(uri)
    name = Path(uri).name if "://" not in uri else uri
    if "://" not in uri and os.path.exists(uri) and not os.path.isfile(uri):
        raise ConfigError(f"{uri}: not a regular file (a folder, FIFO or device); give the tasks.yaml file")
    try:
        with fsspec.open(uri, "rb") as fh:
            raw = fh.read(MAX_TASKS_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{uri}: task config not found") from None
    if len(raw) > MAX_TASKS_FILE_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_TASKS_FILE_BYTES // 1024} KiB; is this the tasks file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{name}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{name}: not a tasks file: YAML nested too deeply") from None
    return parse_tasks(data, source=name)
