"""The ``catalog-tagger`` command line: argument parsing, progress and tables; all work is in the library."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from catalog_tagger.errors import UserError

app = typer.Typer(
    name="catalog-tagger",
    help="Tag large image catalogs with one multi-head model: train it, run it on Ray, query the Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------- synth
@app.command()
def synth(
    out: Annotated[str, typer.Option("--out", help="Where to write the catalog (path or fsspec URL).")],
    images: Annotated[int, typer.Option("--images", "-n", min=1, help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    start: Annotated[int, typer.Option(help="Index of the first image (to add images to a catalog).")] = 0,
) -> None:
    """Write a synthetic product catalog: images, labels.parquet, truth.parquet and tasks.yaml."""
    from catalog_tagger.synthetic import SynthConfig, generate

    res = generate(SynthConfig(out=out, images=images, seed=seed, start=start))
    console.print(f"wrote {len(res.images)} images under [bold]{res.out}[/]")
    console.print(f"labels: {res.labels_uri}\ntasks:  {res.tasks_uri}")


# --------------------------------------------------------------------------------------------- init-model
@app.command("init-model")
def init_model(
    tasks: Annotated[str, typer.Option("--tasks", help="tasks.yaml")],
    out: Annotated[str, typer.Option("--out", help="Artifact directory to write.")],
    backbone: Annotated[str, typer.Option(help="Backbone registry name (see `backbones`).")] = "mobilenet_v3_small",
    image_size: Annotated[int | None, typer.Option(help="Input size in pixels (default: the backbone's).")] = None,
    weights: Annotated[str | None, typer.Option(help="Local safetensors file with pretrained backbone weights.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random init.")] = 0,
) -> None:
    """Write an untrained model artifact (pretrained backbone if available, random heads)."""
    import torch

    from catalog_tagger.config import load_tasks
    from catalog_tagger.model import build_model, card_for, get_backbone, save_artifact

    cfg = load_tasks(tasks)
    spec = get_backbone(backbone)
    torch.manual_seed(seed)
    model = build_model(backbone=backbone, tasks=cfg, weights=weights)
    card = save_artifact(model, card_for(model, image_size=image_size or spec.default_image_size), out)
    console.print(f"wrote model artifact {out} (version {card.version})")


# --------------------------------------------------------------------------------------------- backbones
@app.command()
def backbones() -> None:
    """List the registered backbones."""
    from catalog_tagger.model import backbone_names, count_parameters, get_backbone

    table = Table("backbone", "embedding dim", "default px", "parameters")
    for name in backbone_names():
        spec = get_backbone(name)
        table.add_row(name, str(spec.embedding_dim), str(spec.default_image_size), f"{count_parameters(spec.build()):,}")
    out_console.print(table)


# --------------------------------------------------------------------------------------------- predict
@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", help="Model artifact directory (path or fsspec URL).")],
    images: Annotated[list[str], typer.Argument(help="Image paths or fsspec URLs.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Predict every task for a few images."""
    from catalog_tagger.predict import predict_uris

    results = predict_uris(model, images, device=device)
    if as_json:
        for r in results:
            out_console.print_json(json.dumps(r)) if sys.stdout.isatty() else print(json.dumps(r))  # noqa: T201
        return
    for r in results:
        table = Table(title=r["uri"], show_header=True)
        table.add_column("task")
        table.add_column("prediction")
        table.add_column("score")
        if r["status"] != "ok":
            table.add_row("-", f"[red]error[/]: {r['error']}", "")
        for task, pred in r.get("predictions", {}).items():
            if isinstance(pred["label"], list):
                table.add_row(task, ", ".join(pred["label"]) or "(none)", " ".join(f"{s:.2f}" for s in pred["scores"]))
            else:
                table.add_row(task, pred["label"], f"{pred['score']:.3f}")
        out_console.print(table)


# --------------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Working directory for the demo.")] = Path("demo-out"),
    images: Annotated[int, typer.Option(help="Synthetic images to make.")] = 600,
) -> None:
    """Run the whole product on a synthetic catalog, locally."""
    from catalog_tagger.demo import run_demo

    run_demo(out, images=images, console=console)


def main() -> None:
    """Console-script entry point: user errors exit 2 with a one-line message, no traceback."""
    try:
        rv = app(standalone_mode=False)
    except UserError as err:
        console.print(f"[bold red]error:[/] {err}")
        sys.exit(2)
    except click.exceptions.UsageError as err:
        err.show()
        sys.exit(2)
    except click.exceptions.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        console.print("aborted")
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
