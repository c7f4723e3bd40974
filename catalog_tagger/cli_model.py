"""The model commands ``synth``, ``init-model``, ``backbones`` and ``predict``: make a synthetic catalog or an
untrained artifact, list the backbones, predict a few images in-process. Registered on the ``catalog-tagger`` app by
``cli.py`` (``register``); errors are ``UserError`` (one line, exit 2) like every command's.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)
out_console = Console()


# --------------------------------------------------------------------------------------------- synth
def synth(
    out: Annotated[str, typer.Option("--out", help="Where to write the catalog (path or fsspec URL).")],
    images: Annotated[int, typer.Option("--images", "-n", min=1, help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    start: Annotated[int, typer.Option(help="Index of the first image (to add images to a catalog).")] = 0,
    regression: Annotated[
        bool, typer.Option("--regression", help="Add the regression task 'brightness' (labels and tasks.yaml).")
    ] = False,
) -> None:
    """Write a synthetic product catalog: images, labels.parquet, truth.parquet and tasks.yaml."""
    from catalog_tagger.synthetic.catalog import SynthConfig, generate

    res = generate(SynthConfig(out=out, images=images, seed=seed, start=start, regression=regression))
    console.print(f"wrote {len(res.images)} images under [bold]{res.out}[/]")
    console.print(f"labels: {res.labels_uri}\ntasks:  {res.tasks_uri}")


# --------------------------------------------------------------------------------------------- init-model
def init_model(
    tasks: Annotated[str, typer.Option("--tasks", help="tasks.yaml")],
    out: Annotated[str, typer.Option("--out", help="Artifact directory to write.")],
    backbone: Annotated[str, typer.Option(help="Backbone registry name (see `backbones`).")] = "mobilenet_v3_small",
    image_size: Annotated[int | None, typer.Option(help="Input size in pixels (default: the backbone's).")] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Pretrained backbone weights: a .safetensors file or a folder holding one (docs/weights.md)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random init.")] = 0,
) -> None:
    """Write an untrained model artifact (pretrained backbone if available, random heads)."""
    import torch

    from catalog_tagger.config import load_tasks
    from catalog_tagger.model.artifact import card_for, save_artifact
    from catalog_tagger.model.backbones import get_backbone
    from catalog_tagger.model.multihead import build_model

    cfg = load_tasks(tasks)
    spec = get_backbone(backbone)
    torch.manual_seed(seed)
    model = build_model(backbone=backbone, tasks=cfg, weights=weights)
    card = save_artifact(model, card_for(model, image_size=image_size or spec.default_image_size), out)
    console.print(f"wrote model artifact {out} (version {card.version})")


# --------------------------------------------------------------------------------------------- backbones
def backbones() -> None:
    """List the registered backbones, and the timm provider (timm/<name>)."""
    from catalog_tagger.model.timm_backbone import timm_listing
    from catalog_tagger.render import render_backbones

    render_backbones(out_console)
    out_console.print(timm_listing(), highlight=False, markup=False)


# --------------------------------------------------------------------------------------------- predict
def predict(
    model: Annotated[str, typer.Option("--model", help="Model artifact directory (path or fsspec URL).")],
    images: Annotated[list[str], typer.Argument(help="Image paths or fsspec URLs.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Predict every task for a few images."""
    from catalog_tagger.model.inference import predict_uris
    from catalog_tagger.render import render_predictions

    results = predict_uris(model, images, device=device)
    if not as_json:
        render_predictions(results, out_console)
    elif sys.stdout.isatty():
        for r in results:
            out_console.print_json(json.dumps(r))
    else:
        sys.stdout.writelines(json.dumps(r) + "\n" for r in results)


def register(app: typer.Typer) -> None:
    """Add the commands to the ``catalog-tagger`` app."""
    app.command("synth")(synth)
    app.command("init-model")(init_model)
    app.command("backbones")(backbones)
    app.command("predict")(predict)
