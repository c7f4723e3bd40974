"""The multi-head model: registry, shapes, one backbone pass, artifact round trip, pickle refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from catalog_tagger.config import parse_tasks
from catalog_tagger.errors import ArtifactError, UserError
from catalog_tagger.model.artifact import ModelCard, card_for, load_artifact, load_card, save_artifact
from catalog_tagger.model.backbones import BackboneSpec, backbone_names, get_backbone, register_backbone
from catalog_tagger.model.multihead import build_model

TASKS = parse_tasks(
    {
        "tasks": [
            {"name": "color", "kind": "multiclass", "labels": ["red", "green", "blue"]},
            {"name": "shape", "kind": "multiclass", "labels": ["square", "circle"]},
            {"name": "badges", "kind": "multilabel", "labels": ["sale", "logo", "text"]},
        ]
    }
)
REQUIRED = {"mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50", "efficientnet_b0", "convnext_tiny"}


def test_registry_has_required_backbones_and_refuses_duplicates():
    assert set(backbone_names()) >= REQUIRED
    assert "tiny_cnn" in backbone_names()
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(BackboneSpec("resnet18", nn.Identity, 1))


def test_unknown_backbone_lists_choices():
    with pytest.raises(UserError) as exc:
        get_backbone("vgg99")
    assert "vgg99" in str(exc.value)
    for name in REQUIRED:
        assert name in str(exc.value)


@pytest.mark.parametrize("name", sorted(REQUIRED | {"tiny_cnn", "small_cnn"}))
def test_forward_shapes_every_backbone(name):
    torch.manual_seed(0)
    model = build_model(backbone=name, tasks=TASKS).eval()
    spec = get_backbone(name)
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        out = model(model.prepare(x))
    assert out.embedding.shape == (2, spec.embedding_dim)
    assert model.forward_features(model.prepare(x)).shape == (2, spec.embedding_dim)
    assert {k: tuple(v.shape) for k, v in out.logits.items()} == {"color": (2, 3), "shape": (2, 2), "badges": (2, 3)}


def test_backbone_runs_once_per_forward_for_n_heads():
    model = build_model(backbone="tiny_cnn", tasks=TASKS).eval()
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    head_calls = []
    for head in model.heads.values():
        head.register_forward_hook(lambda *_: head_calls.append(1))
    with torch.inference_mode():
        model(model.prepare(torch.zeros(4, 32, 32, 3, dtype=torch.uint8)))
    assert len(calls) == 1
    assert len(head_calls) == len(TASKS.tasks)


def test_prepare_normalises_uint8_nhwc_on_device():
    model = build_model(backbone="tiny_cnn", tasks=TASKS)
    x = torch.full((1, 4, 4, 3), 255, dtype=torch.uint8)
    y = model.prepare(x)
    assert y.shape == (1, 3, 4, 4)
    expected = (1.0 - model.mean.flatten()) / model.std.flatten()
    assert torch.allclose(y[0, :, 0, 0], expected)


def test_artifact_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_model(backbone="tiny_cnn", tasks=TASKS).eval()
    card = save_artifact(model, card_for(model, image_size=32), tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    loaded, card2 = load_artifact(tmp_path / "m")
    x = model.prepare(torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8))
    with torch.inference_mode():
        a, b = model(x), loaded(x)
    assert torch.equal(a.embedding, b.embedding)
    for k in a.logits:
        assert torch.equal(a.logits[k], b.logits[k])
    assert card2.version == card.version and len(card.version) == 16
    # saving the same weights again gives the same version; different weights a different one
    card3 = save_artifact(model, card_for(model, image_size=32), tmp_path / "m2")
    assert card3.version == card.version
    with torch.no_grad():
        model.heads["color"].bias.add_(1.0)
    assert save_artifact(model, card_for(model, image_size=32), tmp_path / "m3").version != card.version


def test_artifact_loads_from_fsspec_url():
    model = build_model(backbone="tiny_cnn", tasks=TASKS).eval()
    save_artifact(model, card_for(model, image_size=32), "memory://models/tiny")
    loaded, card = load_artifact("memory://models/tiny")
    assert card.backbone == "tiny_cnn"
    assert torch.equal(loaded.heads["shape"].weight, model.heads["shape"].weight)


def test_edited_weights_are_detected(tmp_path):
    model = build_model(backbone="tiny_cnn", tasks=TASKS)
    save_artifact(model, card_for(model, image_size=32), tmp_path / "m")
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    card["image_size"] = 48
    (tmp_path / "m" / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="do not match"):
        load_artifact(tmp_path / "m")


def test_pickle_refused(tmp_path):
    model = build_model(backbone="tiny_cnn", tasks=TASKS)
    pt = tmp_path / "model.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(ArtifactError, match="pickle"):
        load_artifact(pt)
    d = tmp_path / "dir"
    d.mkdir()
    torch.save(model.state_dict(), d / "weights.pth")
    with pytest.raises(ArtifactError, match="pickle"):
        load_artifact(d)
    with pytest.raises(ArtifactError, match="pickle"):
        build_model(backbone="tiny_cnn", tasks=TASKS, weights=str(pt))


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a model artifact"):
        load_card(tmp_path)


def test_local_safetensors_backbone_weights_are_used(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = build_model(backbone="tiny_cnn", tasks=TASKS)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, path)
    torch.manual_seed(4)
    dst = build_model(backbone="tiny_cnn", tasks=TASKS, weights=str(path))
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v)


def test_random_init_warns(caplog):
    with caplog.at_level("WARNING"):
        build_model(backbone="tiny_cnn", tasks=TASKS)
    assert "random init" in caplog.text


# The card's schema is part of the artifact contract: changing it must be deliberate.
GOLDEN_CARD_FIELDS = {
    "backbone": str,
    "image_size": int,
    "mean": list,
    "std": list,
    "embedding_dim": int,
    "tasks": list,
    "created_at": str,
    "metrics": dict,
    "training": dict,
    "schema_version": int,
    "version": str,
}


def test_card_golden_schema(tmp_path):
    model = build_model(backbone="tiny_cnn", tasks=TASKS)
    save_artifact(model, card_for(model, image_size=32), tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "model.json").read_text())
    assert {k: type(v) for k, v in raw.items()} == GOLDEN_CARD_FIELDS
    assert raw["schema_version"] == 1
    assert raw["tasks"][0] == {
        "name": "color",
        "kind": "multiclass",
        "labels": ["red", "green", "blue"],
        "weight": 1.0,
        "threshold": None,
    }
    assert set(ModelCard.__dataclass_fields__) == set(GOLDEN_CARD_FIELDS)
