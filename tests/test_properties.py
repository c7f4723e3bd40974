"""Property-based tests (hypothesis): task-config validation and the output schema, for random task sets."""

from __future__ import annotations

import io
import json
import keyword
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from catalog_tagger.config import RESERVED_COLUMNS, TaskConfig, parse_tasks
from catalog_tagger.errors import ConfigError
from catalog_tagger.model.artifact import ModelCard
from catalog_tagger.model.inference import output_columns
from catalog_tagger.model.multihead import ModelOutput
from catalog_tagger.schema import ACCEL_COL, BASE_FIELDS, DECODE_COL, OUTPUT_SCHEMA_VERSION, output_schema
from catalog_tagger.tag.predictor import Predictor

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ strategies
names = st.from_regex(r"[a-z][a-z0-9_]{0,14}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n) and n not in RESERVED_COLUMNS
)
# Printable text, YAML-safe (no surrogates or control characters), never blank.
label_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=12
).filter(lambda s: s.strip() != "")
open_unit = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True, allow_nan=False)


@st.composite
def task_specs(draw, name: str) -> dict:
    kind = draw(st.sampled_from(["multiclass", "multilabel"]))
    labels = draw(st.lists(label_text, min_size=2 if kind == "multiclass" else 1, max_size=6, unique=True))
    spec: dict = {"name": name, "kind": kind, "labels": labels}
    if draw(st.booleans()):
        spec["weight"] = draw(st.floats(min_value=1e-3, max_value=100, allow_nan=False))
    if kind == "multilabel" and draw(st.booleans()):
        spec["threshold"] = draw(open_unit)
    return spec


@st.composite
def task_configs(draw) -> dict:
    chosen = draw(st.lists(names, min_size=1, max_size=5, unique=True))
    # a task may not be called like another task's score column
    assume(not any(f"{a}{s}" in chosen for a in chosen for s in ("_score", "_scores")))
    return {"tasks": [draw(task_specs(n)) for n in chosen]}


BAD_NAMES = ["Color", "1st", "a-b", "", "has space", "class", "uri", "embedding", "x" * 64, "é"]

# (field the error must name, how to break one task)
MUTATIONS = {
    "name": lambda d, t: t.update(name=d(st.sampled_from(BAD_NAMES))),
    "kind": lambda d, t: t.update(kind=d(st.text(max_size=10).filter(lambda k: k not in ("multiclass", "multilabel")))),
    "labels": lambda d, t: t.update(
        labels=d(
            st.sampled_from(
                [
                    [*t["labels"], t["labels"][0]],  # duplicate label
                    [*t["labels"], "  "],  # blank label
                    t["labels"][:1] if t["kind"] == "multiclass" else [],  # too few labels
                ]
            )
        )
    ),
    "threshold": lambda d, t: t.update(
        threshold=d(open_unit)
        if t["kind"] == "multiclass"
        else d(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("nan"))))
    ),
    "weight": lambda d, t: t.update(weight=d(st.floats(max_value=0.0, allow_nan=False))),
    "extra": lambda d, t: t.update({d(names.filter(lambda n: n not in t)): 1}),
}


# ------------------------------------------------------------------------------------------ config validation
@PROPS
@given(data=task_configs())
def test_valid_task_configs_load_and_round_trip_through_yaml(data):
    cfg = parse_tasks(data, source="tasks.yaml")
    assert cfg.names == [t["name"] for t in data["tasks"]]
    text = cfg.to_yaml()
    again = parse_tasks(yaml.safe_load(text), source="tasks.yaml")
    assert again == cfg
    assert [list(t.labels) for t in again.tasks] == [t["labels"] for t in data["tasks"]]


@PROPS
@given(data=task_configs(), field=st.sampled_from(sorted(MUTATIONS)), draw=st.data())
def test_invalid_task_configs_raise_config_error_naming_the_field(data, field, draw):
    tasks = data["tasks"]
    target = tasks[draw.draw(st.integers(0, len(tasks) - 1))]
    before = dict(target)
    MUTATIONS[field](draw.draw, target)
    if field == "extra":
        field = next(k for k in target if k not in before)
    if field == "name":
        assume(target["name"] not in [t["name"] for t in tasks if t is not target])
    with pytest.raises(ConfigError) as exc:
        parse_tasks(data, source="tasks.yaml")
    msg = str(exc.value)
    assert msg.startswith("tasks.yaml: ") and f"field {field!r}" in msg, (field, target, msg)


@PROPS
@given(data=task_configs())
def test_duplicate_task_names_are_refused_naming_tasks(data):
    data["tasks"].append(dict(data["tasks"][0]))
    with pytest.raises(ConfigError, match=r"field 'tasks': duplicate task name"):
        parse_tasks(data, source="tasks.yaml")


# ------------------------------------------------------------------------------------------ output schema
def expected_columns(cfg: TaskConfig, dim: int) -> list[tuple[str, pa.DataType]]:
    cols = [(f.name, f.type) for f in BASE_FIELDS]
    for t in cfg.tasks:
        if t.kind == "multiclass":
            cols += [(t.name, pa.string()), (f"{t.name}_score", pa.float32())]
        else:
            cols += [(t.name, pa.list_(pa.string())), (f"{t.name}_scores", pa.list_(pa.float32()))]
    return [*cols, ("embedding", pa.list_(pa.float32(), dim)), ("tagged_at", pa.timestamp("us", tz="UTC"))]


@PROPS
@given(data=task_configs(), dim=st.integers(1, 64))
def test_output_schema_has_exactly_the_expected_columns(data, dim):
    cfg = parse_tasks(data)
    schema = output_schema(cfg, dim)
    assert [(f.name, f.type) for f in schema] == expected_columns(cfg, dim)
    assert len(set(schema.names)) == len(schema.names)
    assert schema.metadata[b"catalog_tagger.schema_version"] == str(OUTPUT_SCHEMA_VERSION).encode()
    assert TaskConfig.model_validate(json.loads(schema.metadata[b"catalog_tagger.tasks"])) == cfg


def _card(cfg: TaskConfig, dim: int) -> ModelCard:
    return ModelCard(
        backbone="tiny_cnn",
        image_size=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        embedding_dim=dim,
        tasks=[t.model_dump(mode="json") for t in cfg.tasks],
    )


@PROPS
@given(
    data=task_configs(),
    dim=st.integers(1, 16),
    statuses=st.lists(st.booleans(), min_size=1, max_size=9),
    seed=st.integers(0, 2**16),
)
def test_predictor_rows_for_random_outputs_validate_against_the_schema(data, dim, statuses, seed):
    """The actor's table (without Ray): random logits/embeddings and a random mix of ok and error rows."""
    cfg = parse_tasks(data)
    card = _card(cfg, dim)
    n = len(statuses)
    ok = np.flatnonzero(statuses)
    gen = torch.Generator().manual_seed(seed)
    out = ModelOutput(
        embedding=torch.randn(len(ok), dim, generator=gen) * 10,
        logits={t.name: torch.randn(len(ok), len(t.labels), generator=gen) * 5 for t in cfg.tasks},
    )
    cols = output_columns(card, out) if len(ok) else {}
    status = np.array(["ok" if s else "error" for s in statuses], dtype=object)
    batch = {
        "uri": np.array([f"s3://b/k é {i}.jpg" for i in range(n)], dtype=object),
        "size": np.array([100 + i for i in range(n)], dtype=object),
        "etag": np.array([None] * n, dtype=object),
        "mtime": np.array([None] * n, dtype=object),
        "content_hash": np.array([f"h{i}" if s else None for i, s in enumerate(statuses)], dtype=object),
        "status": status,
        "error": np.array([None if s else "decode: broken" for s in statuses], dtype=object),
        "width": np.full(n, 640, dtype=np.int32),
        "height": np.full(n, 480, dtype=np.int32),
        DECODE_COL: np.zeros(n),
    }
    predictor = Predictor.__new__(Predictor)  # the table-building half of the actor, without a model
    predictor.card, predictor.tasks = card, cfg
    predictor.schema, predictor.run_id, predictor.tagged_at = output_schema(cfg, dim), "run-1", datetime.now(UTC)
    table = predictor._to_table(batch, ok, cols, n, accel_s=1.0)
    table.validate(full=True)
    rows = table.drop_columns([ACCEL_COL, DECODE_COL])
    assert rows.schema == output_schema(cfg, dim) and rows.schema.metadata == output_schema(cfg, dim).metadata
    assert abs(sum(table.column(ACCEL_COL).to_pylist()) - 1.0) < 1e-9
    buf = io.BytesIO()
    pq.write_table(rows, buf)
    assert pq.read_table(io.BytesIO(buf.getvalue())).schema == rows.schema
    for i, row in enumerate(rows.to_pylist()):
        if not statuses[i]:
            assert row["error"] and row["embedding"] is None and row["width"] is None
            assert all(row[t.name] is None for t in cfg.tasks)
            continue
        j = int(np.searchsorted(ok, i))
        assert row["error"] is None and row["width"] == 640
        np.testing.assert_array_equal(np.float32(row["embedding"]), out.embedding[j].numpy().astype(np.float32))
        for t in cfg.tasks:
            if t.kind == "multiclass":
                assert row[t.name] in t.labels and 0.0 <= row[f"{t.name}_score"] <= 1.0
            else:
                scores = row[f"{t.name}_scores"]
                assert len(scores) == len(t.labels) and all(0.0 <= s <= 1.0 for s in scores)
                thr = np.float32(t.effective_threshold)
                on = [lab for lab, s in zip(t.labels, scores, strict=True) if np.float32(s) >= thr]
                assert row[t.name] == on
