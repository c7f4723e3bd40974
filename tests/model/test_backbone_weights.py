"""``--weights`` for every backbone: a safetensors file or a folder holding one, loaded exactly; pickles and
anything ambiguous refused in one line before any work. Weights are random models saved here (nothing downloads)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from catalog_tagger.config import parse_tasks
from catalog_tagger.errors import ArtifactError
from catalog_tagger.model.multihead import build_model
from catalog_tagger.model.weights import weights_file

TASKS = parse_tasks({"tasks": [{"name": "kind", "kind": "multiclass", "labels": ["a", "b"]}]})


def _torchvision_file(path, seed: int = 5) -> dict[str, torch.Tensor]:
    """torchvision's mobilenet_v3_small with its classifier, saved the way a converted hub checkpoint is."""
    import torchvision.models as tvm

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in tvm.mobilenet_v3_small(weights=None).state_dict().items()}
    save_file(state, str(path))
    return state


def _assert_loaded(model, state: dict[str, torch.Tensor]) -> None:
    own = model.backbone.state_dict()
    assert set(own) == {k for k in state if k.startswith("features.")}  # the classifier is not ours
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def test_torchvision_weights_from_a_file(tmp_path):
    state = _torchvision_file(tmp_path / "mnv3.safetensors")
    _assert_loaded(
        build_model(backbone="mobilenet_v3_small", tasks=TASKS, weights=str(tmp_path / "mnv3.safetensors")), state
    )


def test_torchvision_weights_from_a_folder(tmp_path):
    only = tmp_path / "only"
    only.mkdir()
    state = _torchvision_file(only / "mobilenet_v3_small-imagenet.safetensors")
    (only / "README.md").write_text("converted on a machine with internet")
    _assert_loaded(build_model(backbone="mobilenet_v3_small", tasks=TASKS, weights=str(only)), state)
    # several files: model.safetensors (the Hugging Face name) is the one
    many = tmp_path / "many"
    many.mkdir()
    _torchvision_file(many / "other.safetensors", seed=1)
    state = _torchvision_file(many / "model.safetensors", seed=2)
    _assert_loaded(build_model(backbone="mobilenet_v3_small", tasks=TASKS, weights=str(many)), state)


def test_a_trained_artifact_can_seed_the_backbone(tmp_path):
    """Our own artifact folder (``backbone.*`` and ``heads.*`` keys): its backbone starts the new model."""
    from catalog_tagger.model.artifact import card_for, save_artifact

    torch.manual_seed(1)
    src = build_model(backbone="tiny_cnn", tasks=TASKS)
    save_artifact(src, card_for(src, image_size=32), tmp_path / "m")
    torch.manual_seed(2)
    dst = build_model(backbone="tiny_cnn", tasks=TASKS, weights=str(tmp_path / "m"))
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k


def _refusal(tmp_path, case: str) -> str:
    """Make the bad weights of ``case`` under ``tmp_path``; return the path to pass as ``--weights``."""
    if case == "missing":
        return str(tmp_path / "nowhere.safetensors")
    if case == "pickle file":
        (tmp_path / "w.pth").write_bytes(b"\x80\x04not really")
        return str(tmp_path / "w.pth")
    if case == "junk":
        (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
        return str(tmp_path / "junk.safetensors")
    folder = tmp_path / "f"
    folder.mkdir()
    if case == "two files":
        for name in ("a.safetensors", "b.safetensors"):
            save_file({"x": torch.zeros(1)}, str(folder / name))
    elif case == "pickles only":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif case == "wrong model":
        save_file({"features.0.0.weight": torch.zeros(4, 3, 3, 3)}, str(folder / "model.safetensors"))
    return str(folder)


REFUSALS = {
    "missing": "weights file or folder not found",
    "pickle file": "pickle is refused",
    "junk": "not a safetensors file",
    "two files": "2 .safetensors files in this folder (a.safetensors, b.safetensors)",
    "pickles only": "pickle checkpoint(s) ['pytorch_model.bin'] are refused",
    "empty folder": "no .safetensors file in this folder",
    "wrong model": "tensor 'features.0.0.weight' is [4, 3, 3, 3]",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_weights_are_one_line_refusals(tmp_path, case):
    weights = _refusal(tmp_path, case)
    with pytest.raises(ArtifactError) as err:
        build_model(backbone="mobilenet_v3_small", tasks=TASKS, weights=weights)
    assert REFUSALS[case] in str(err.value) and "\n" not in str(err.value)


def test_weights_file_resolves_fsspec_urls(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    _, path = weights_file(f"file://{tmp_path}")
    assert path.endswith("/model.safetensors")
