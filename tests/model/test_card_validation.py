"""model.json is validated before any work (issue 13, case 15): a self-consistent card (its version hash
recomputed) with a bad field, weights of another shape or NaN weights are refused with one line naming the field;
a model whose output still goes non-finite (overflow) yields error rows, never ``ok`` rows with NaN scores."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

from catalog_tagger.config import parse_tasks
from catalog_tagger.errors import ArtifactError
from catalog_tagger.model.artifact import (
    ModelCard,
    card_for,
    check_weights,
    compute_version,
    load_artifact,
    load_card,
    save_artifact,
)
from catalog_tagger.model.inference import NONFINITE_ERROR, predict_uris
from catalog_tagger.model.multihead import build_model

TASKS = parse_tasks(
    {
        "tasks": [
            {"name": "color", "kind": "multiclass", "labels": ["red", "green", "blue"]},
            {"name": "badges", "kind": "multilabel", "labels": ["sale", "logo"]},
        ]
    }
)


@pytest.fixture
def artifact(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model(backbone="tiny_cnn", tasks=TASKS)
    out = tmp_path / "m"
    save_artifact(model, card_for(model, image_size=32), out)
    return out


def _rewrite(art: Path, edit) -> None:
    """Edit the card's JSON and recompute its version hash, as a careful forger (or a buggy tool) would."""
    raw = json.loads((art / "model.json").read_text())
    edit(raw)
    blob = (art / "model.safetensors").read_bytes()
    known = {k: v for k, v in raw.items() if k in ModelCard.__dataclass_fields__}
    raw["version"] = compute_version(blob, ModelCard(**known))
    (art / "model.json").write_text(json.dumps(raw))


def _keep(raw):
    """No edit: only the version hash is recomputed (for weights changed under the card)."""


def _set(key, value):
    def edit(raw):
        raw[key] = value

    return edit


BAD_CARDS = {
    "image_size 0": (_set("image_size", 0), "image_size"),
    "image_size text": (_set("image_size", "abc"), "image_size"),
    "image_size 60000": (_set("image_size", 60000), "image_size"),
    "image_size under the backbone's minimum": (_set("image_size", 4), "image_size"),
    "image_size a bool": (_set("image_size", True), "image_size"),
    "embedding_dim wrong": (_set("embedding_dim", 31), "embedding_dim"),
    "tasks a string": (_set("tasks", "color"), "tasks"),
    "tasks empty": (_set("tasks", []), "tasks"),
    "tasks of strings": (_set("tasks", ["color"]), "tasks"),
    "task without kind": (_set("tasks", [{"name": "color", "labels": ["a", "b"]}]), "kind"),
    "task with duplicate labels": (
        _set("tasks", [{"name": "color", "kind": "multiclass", "labels": ["a", "a"]}]),
        "labels",
    ),
    "label_thresholds of the wrong length": (
        lambda raw: raw["tasks"][1].update(label_thresholds=[0.5]),
        "label_thresholds",
    ),
    "mean of two numbers": (_set("mean", [0.5, 0.5]), "mean"),
    "mean not numbers": (_set("mean", ["a", 0, 0]), "mean"),
    "std zero": (_set("std", [0.0, 0.2, 0.2]), "std"),
    "std NaN": (_set("std", [float("nan"), 0.2, 0.2]), "std"),
    "std infinite": (_set("std", [float("inf"), 0.2, 0.2]), "std"),
    "unknown backbone": (_set("backbone", "nope"), "backbone"),
    "newer schema": (_set("schema_version", 2), "schema_version"),
}


@pytest.mark.parametrize("case", sorted(BAD_CARDS))
def test_a_bad_field_is_refused_with_one_line_naming_it(artifact, case):
    edit, field = BAD_CARDS[case]
    _rewrite(artifact, edit)
    with pytest.raises(ArtifactError) as info:
        load_card(artifact)
    msg = str(info.value)
    assert field in msg and "\n" not in msg, msg
    with pytest.raises(ArtifactError):
        load_artifact(artifact)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"[1, 2, 3]", "this is an array"),
        (b'{"backbone": "tiny_cnn",', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"null", "this is null"),
    ],
)
def test_a_card_that_is_not_a_json_object_is_refused(artifact, content, words):
    (artifact / "model.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=words) as info:
        load_card(artifact)
    assert "\n" not in str(info.value)


def test_a_valid_card_keeps_its_version(artifact):
    """Validation reads the card; it never rewrites it: the content hash stays what save_artifact wrote."""
    raw = json.loads((artifact / "model.json").read_text())
    card = load_card(artifact)
    assert card.version == raw["version"]
    assert compute_version((artifact / "model.safetensors").read_bytes(), card) == raw["version"]
    check_weights(artifact)
    load_artifact(artifact)


def test_a_card_load_card_would_refuse_is_never_written(tmp_path):
    """``init-model --image-size 60000`` used to write an artifact that blew memory at its first use."""
    model = build_model(backbone="tiny_cnn", tasks=TASKS)
    with pytest.raises(ArtifactError, match=r"field 'image_size': 60000 is outside 8\.\.1024 px"):
        save_artifact(model, card_for(model, image_size=60000), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_weights_of_another_shape_are_refused_by_name(artifact):
    """Weights of a model with other labels, under a card recomputed to match them: the card's tasks say 3
    colours, the weights hold 4 (a self-consistent forgery, so only the shape check can see it)."""
    other = parse_tasks(
        {
            "tasks": [
                {"name": "color", "kind": "multiclass", "labels": ["red", "green", "blue", "black"]},
                {"name": "badges", "kind": "multilabel", "labels": ["sale", "logo"]},
            ]
        }
    )
    state = build_model(backbone="tiny_cnn", tasks=other).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(artifact / "model.safetensors"))
    _rewrite(artifact, _keep)
    for load in (check_weights, load_artifact):
        with pytest.raises(ArtifactError, match=r"heads\.color\.weight.*\[4, 32\].*\[3, 32\]"):
            load(artifact)


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", b"\xff" * 64])
def test_weights_that_are_not_safetensors_are_refused(artifact, content):
    (artifact / "model.safetensors").write_bytes(content)
    _rewrite(artifact, _keep)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        check_weights(artifact)


def test_nan_weights_are_refused(artifact):
    state = load_file(str(artifact / "model.safetensors"))
    state["heads.color.weight"][0, 0] = float("nan")
    save_file(state, str(artifact / "model.safetensors"))
    _rewrite(artifact, _keep)
    for load in (check_weights, load_artifact):
        with pytest.raises(ArtifactError, match=r"'heads\.color\.weight' holds NaN"):
            load(artifact)


# --------------------------------------------------------------------------------------------- non-finite outputs
@pytest.fixture(scope="module")
def overflowing(tmp_path_factory, catalog_kit):
    """A catalog and a model with finite but huge head weights: the logits overflow to inf (as an fp16 overflow
    or a diverged training would make them)."""
    kit = catalog_kit(images=4, seed=2, min_size=64, max_size=96, name="overflow")
    torch.manual_seed(0)
    model = build_model(backbone="tiny_cnn", tasks=TASKS)
    with torch.no_grad():
        for head in model.heads.values():  # 3e38 x (1 + sum of a ReLU embedding) > float32's max of 3.4e38
            head.weight.fill_(3e38)
            head.bias.fill_(3e38)
    out = tmp_path_factory.mktemp("overflow-model")
    save_artifact(model, card_for(model, image_size=32), out)
    return kit, str(out)


def test_non_finite_outputs_are_error_rows_in_predict(overflowing):
    kit, model = overflowing
    results = predict_uris(model, kit["images"][:2], device="cpu")
    assert [r["status"] for r in results] == ["error", "error"]
    assert all(r["error"] == NONFINITE_ERROR and "predictions" not in r for r in results)


def test_non_finite_outputs_are_error_rows_in_the_predictor(overflowing):
    from catalog_tagger.tag.predictor import Predictor
    from catalog_tagger.tag.reader import DecodeStage

    kit, model = overflowing
    uris = [*kit["images"][:2], str(Path(kit["root"]) / "missing.jpg")]
    batch = DecodeStage(image_size=32)(pa.table({"uri": uris, "size": [None] * 3, "etag": [None] * 3,
                                                 "mtime": [None] * 3}))  # fmt: skip
    predictor = Predictor(model, run_id="r", tagged_at=datetime.now(UTC), device="cpu")
    rows = predictor(batch).to_pylist()
    assert [r["status"] for r in rows] == ["error"] * 3
    assert [r["error"] for r in rows[:2]] == [NONFINITE_ERROR] * 2
    assert rows[2]["error"].startswith("read")  # the row that failed to read keeps its own reason
    assert all(r["color"] is None and r["color_score"] is None and r["embedding"] is None for r in rows)
    assert all(r["width"] is None for r in rows)


# --------------------------------------------------------------------------------------------- the commands
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_tag_refuses_a_bad_card_before_writing_anything(artifact, catalog_kit, tmp_path):
    """``image_size: 60000`` once took 5 GB; now it is one line, exit 2, and the output is untouched."""
    kit = catalog_kit(images=2, seed=1, min_size=64, max_size=96, name="badcard")
    _rewrite(artifact, _set("image_size", 60000))
    out = tmp_path / "out"
    r = _cli("tag", "--model", str(artifact), "--source", kit["source"], "--output", str(out), "--executor", "local")
    assert r.returncode == 2, r.stderr
    assert "image_size" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (out / "_staging").exists() and not (out / "runs").exists()


def test_predict_refuses_weights_of_another_shape(artifact, catalog_kit):
    kit = catalog_kit(images=1, seed=1, min_size=64, max_size=96, name="badshape")
    state = load_file(str(artifact / "model.safetensors"))
    state["heads.badges.bias"] = torch.zeros(5)
    save_file(state, str(artifact / "model.safetensors"))
    _rewrite(artifact, _keep)
    r = _cli("predict", "--model", str(artifact), "--device", "cpu", kit["images"][0])
    assert r.returncode == 2, r.stderr
    assert "heads.badges.bias" in r.stderr and "Traceback" not in r.stderr
