"""timm as an optional backbone provider: ``timm/<name>`` built random-init, weights only from a local safetensors
file made here (nothing downloads), the card naming the provider, and one-line errors without timm."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from catalog_tagger.config import parse_tasks
from catalog_tagger.errors import ArtifactError, UserError
from catalog_tagger.model.artifact import load_artifact
from catalog_tagger.model.backbones import IMAGENET_MEAN, IMAGENET_STD, get_backbone
from catalog_tagger.model.multihead import build_model

timm = pytest.importorskip("timm")

TASKS = parse_tasks({"tasks": [{"name": "kind", "kind": "multiclass", "labels": ["a", "b", "c"]}]})
NAME = "test_resnet"  # timm's own tiny test model: 0.37 M parameters, normalised with mean = std = 0.5


@pytest.fixture
def tasks_yaml(tmp_path) -> str:
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n  - {name: kind, kind: multiclass, labels: [a, b, c]}\n")
    return str(path)


def _timm_file(path, name: str = NAME, seed: int = 7) -> dict[str, torch.Tensor]:
    """A random timm model with a classifier, saved as a safetensors file the way timm/Hugging Face ship one."""
    torch.manual_seed(seed)
    state = {
        k: v.contiguous() for k, v in timm.create_model(name, pretrained=False, num_classes=10).state_dict().items()
    }
    save_file(state, str(path))
    return state


def _assert_backbone_is(model, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the timm trunk equals the file's (the file's classifier is dropped)."""
    own = model.backbone.model.state_dict()
    assert set(own) == set(state) - {"fc.weight", "fc.bias"}
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def test_spec_comes_from_timm_and_the_lookup_leaves_the_seed_alone():
    before = torch.get_rng_state()
    spec = get_backbone(f"timm/{NAME}")
    assert torch.equal(before, torch.get_rng_state())
    assert spec.provider == "timm"
    assert spec.embedding_dim == timm.create_model(NAME, num_classes=0).num_features == 96
    assert spec.default_image_size == 160
    vit = get_backbone("timm/test_vit")  # a fixed-size model accepts only its own size
    assert vit.min_image_size == vit.max_image_size == 160


def test_weights_file_and_folder_load_exactly(tmp_path):
    state = _timm_file(tmp_path / "w.safetensors")
    _assert_backbone_is(
        build_model(backbone=f"timm/{NAME}", tasks=TASKS, weights=str(tmp_path / "w.safetensors")), state
    )
    folder = tmp_path / "hub"
    folder.mkdir()
    _timm_file(folder / "model.safetensors", seed=8)
    (folder / "config.json").write_text("{}")  # a Hugging Face snapshot folder holds more than the weights
    moved = build_model(backbone=f"timm/{NAME}", tasks=TASKS, weights=str(folder))
    _assert_backbone_is(moved, dict(_timm_file(tmp_path / "again.safetensors", seed=8)))


def test_trunk_feeds_timm_its_own_normalisation():
    """Our model normalises with ImageNet's mean/std; test_resnet was trained on (x - 0.5) / 0.5: the trunk maps one
    onto the other exactly, so pretrained weights see the inputs they were trained on."""
    torch.manual_seed(0)
    model = build_model(backbone=f"timm/{NAME}", tasks=TASKS).eval()
    x = torch.randint(0, 255, (2, 48, 48, 3), dtype=torch.uint8)
    raw = x.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ours = model.forward_features(model.prepare(x))
        theirs = model.backbone.model((raw - 0.5) / 0.5)
    assert model.backbone.renorm
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert list(model.mean.flatten().tolist()) == pytest.approx(IMAGENET_MEAN)
    assert list(model.std.flatten().tolist()) == pytest.approx(IMAGENET_STD)


def test_init_model_writes_an_artifact_that_rebuilds_the_timm_model(tmp_path, tasks_yaml):
    from catalog_tagger.cli_model import init_model

    state = _timm_file(tmp_path / "w.safetensors")
    init_model(
        tasks=tasks_yaml, out=str(tmp_path / "m"), backbone=f"timm/{NAME}", image_size=64,
        weights=str(tmp_path / "w.safetensors"), seed=0,
    )  # fmt: skip
    model, card = load_artifact(tmp_path / "m")
    assert card.backbone == f"timm/{NAME}" and card.embedding_dim == 96 and card.image_size == 64
    _assert_backbone_is(model, state)
    with torch.inference_mode():
        out = model(model.prepare(torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)))
    assert out.embedding.shape == (2, 96)


def test_unknown_timm_model_is_one_line():
    with pytest.raises(UserError, match=r"timm has no model 'no_such_net'.*list_models") as err:
        get_backbone("timm/no_such_net")
    assert "\n" not in str(err.value)


def test_weights_of_another_model_are_refused(tmp_path):
    _timm_file(tmp_path / "eff.safetensors", name="test_efficientnet")
    with pytest.raises(
        ArtifactError,
        match=r"do not fit: tensor '[\w.]+' is \[\d+(, \d+)*\], the backbone's .*weights of another model",
    ) as err:
        build_model(backbone=f"timm/{NAME}", tasks=TASKS, weights=str(tmp_path / "eff.safetensors"))
    assert "\n" not in str(err.value)


def _cli(*args: str, block_timm: bool = False) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh process; ``block_timm`` makes ``import timm`` fail as if not installed."""
    pre = "import sys; sys.modules['timm'] = None; " if block_timm else ""
    code = pre + "import sys; from catalog_tagger.cli import main; sys.argv[0] = 'catalog-tagger'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def _one_line_exit_2(r: subprocess.CompletedProcess[str], says: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], r.stderr


@pytest.mark.slow
def test_cli_without_timm_says_what_to_install(tmp_path, tasks_yaml):
    r = _cli("init-model", "--tasks", tasks_yaml, "--out", str(tmp_path / "m"), "--backbone", "timm/resnet18",
             block_timm=True)  # fmt: skip
    _one_line_exit_2(r, "pip install 'catalog-tagger[timm]'")
    r = _cli("backbones", block_timm=True)
    assert r.returncode == 0 and "pip install 'catalog-tagger[timm]'" in " ".join(r.stdout.split())


@pytest.mark.slow
def test_cli_bad_weights_are_one_line_exit_2(tmp_path, tasks_yaml):
    """Through the real entry point (the other refusals are the same ``ArtifactError``s: test_backbone_weights.py)."""
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    r = _cli("init-model", "--tasks", tasks_yaml, "--out", str(tmp_path / "m"), "--backbone", f"timm/{NAME}",
             "--weights", str(tmp_path / "junk.safetensors"))  # fmt: skip
    _one_line_exit_2(r, "not a safetensors file")
    assert not (tmp_path / "m").exists()
