"""The ``train`` command: train the multi-head model (``train.pipeline``), show its metrics and the promotion
gate's verdict (exit 3 when the new model was not promoted). Registered on the ``catalog-tagger`` app by ``cli.py``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)
out_console = Console()


def train(
    tasks: Annotated[str, typer.Option("--tasks", help="tasks.yaml (path or fsspec URL).")],
    labels: Annotated[str, typer.Option("--labels", help="Labels table (.parquet/.csv): uri + a column per task.")],
    out: Annotated[str, typer.Option("--out", help="Model artifact directory to write.")],
    backbone: Annotated[str | None, typer.Option(help="Backbone registry name (default small_cnn).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Input px (default: the backbone's).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs; early stopping may stop sooner (15).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Global batch size (default 64).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (default 2e-3).")] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience in epochs (default 4).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="cosine (default) | plateau (ReduceLROnPlateau).")] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Pretrained backbone weights: a .safetensors file or a folder holding one (docs/weights.md)."
        ),
    ] = None,
    freeze_backbone_epochs: Annotated[
        int | None,
        typer.Option(
            "--freeze-backbone-epochs", help="Train only the heads for N epochs, then unfreeze the backbone (0)."
        ),
    ] = None,
    backbone_lr_factor: Annotated[
        float | None, typer.Option("--backbone-lr-factor", help="The backbone trains at lr x F, e.g. 0.1 (1).")
    ] = None,
    loss_balance: Annotated[
        str | None,
        typer.Option(
            "--loss-balance", help="fixed (tasks.yaml weights, default) | uncertainty (learned, Kendall et al. 2018)."
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train data-parallel workers (>1 uses Ray).")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Train on this Ray cluster.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, init, shuffling, augmentation (default 0).")] = None,
    single_task: Annotated[
        bool, typer.Option("--single-task", help="Also train one model per task; write comparison.json.")
    ] = False,
    max_images: Annotated[int | None, typer.Option("--max-images", help="Use only the first N rows.")] = None,
    color_jitter: Annotated[float | None, typer.Option("--color-jitter", help="Colour jitter (0 = off).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    promote_to: Annotated[
        str | None,
        typer.Option("--promote-to", help="The current model folder (what nightly reads): gate, then promote there."),
    ] = None,
    promotion_tolerance: Annotated[
        float | None,
        typer.Option("--promotion-tolerance", min=0, help="A task's headline metric may be this much worse (0.01)."),
    ] = None,
) -> None:
    """Train the multi-head model on a labels table and write the artifact (+ metrics.csv, split, report).

    With --promote-to, the new model replaces the one there only when no task's headline metric is worse than the
    current model's by more than --promotion-tolerance on the same test split. Exit codes: 0 done (and promoted);
    2 refused (bad input); 3 trained and saved in --out, but not promoted (the current model is unchanged).
    """
    from catalog_tagger.render import render_training
    from catalog_tagger.train.compare import iter_comparison_rows
    from catalog_tagger.train.config import TrainConfig
    from catalog_tagger.train.pipeline import train as run_training

    cfg = TrainConfig.parse(
        tasks=tasks, labels=labels, out=out, backbone=backbone, image_size=image_size, epochs=epochs,
        batch_size=batch_size, lr=lr, patience=patience, scheduler=scheduler, weights=weights, workers=workers,
        ray_address=ray_address, seed=seed, single_task=single_task, max_images=max_images,
        color_jitter=color_jitter, device=device, promote_to=promote_to, promotion_tolerance=promotion_tolerance,
        freeze_backbone_epochs=freeze_backbone_epochs, backbone_lr_factor=backbone_lr_factor, loss_balance=loss_balance,
    )  # fmt: skip
    res = run_training(cfg)
    render_training(res, iter_comparison_rows(res.comparison) if res.comparison else [], out_console)
    skipped = len(res.skipped)
    console.print(
        f"wrote model artifact [bold]{res.out}[/] (version {res.card.version}): {res.images_used} images, "
        f"{skipped} skipped, best epoch {res.best_epoch}/{res.epochs_run}, {res.seconds:.0f}s"
    )
    if res.promotion is not None:
        _promotion_verdict(res.promotion)


def _promotion_verdict(promotion: dict[str, Any]) -> None:
    """The promotion gate's comparison table and decision; exit 3 when the new model was not promoted."""
    from rich.table import Table

    from catalog_tagger.train.promote import EXIT_NOT_PROMOTED, comparison_rows

    rows = comparison_rows(promotion)
    if rows:
        table = Table("task", "metric", "current", "new", "change", "verdict", title="promotion gate (same test split)")
        for row in rows:
            table.add_row(*(escape(c) for c in row))
        out_console.print(table)
    console.print(promotion["message"], markup=False, highlight=False, soft_wrap=True)
    if not promotion["promoted"]:
        raise typer.Exit(EXIT_NOT_PROMOTED)


def register(app: typer.Typer) -> None:
    """Add ``train`` to the ``catalog-tagger`` app."""
    app.command()(train)
