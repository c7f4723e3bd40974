"""Fixed vs learned (uncertainty) loss balance on the synthetic catalog: per-task test metrics side by side.

Both balances train on the same images, with the same split and the same seeds (the split, the init and the
augmentation stream depend only on the seed), so the only difference is ``loss_balance``. Several seeds, because
one run per side would mostly measure seed noise. Not part of ``make bench``: it trains models (minutes).

    python -m bench.loss_balance                        # 600 images (with the regression task), seeds 0-4
    python -m bench.loss_balance --images 300 --seeds 0 --epochs 10   # a quick look

Prints a table (mean over seeds, and each seed) and writes bench/results/loss_balance.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "loss_balance"
RESULTS = ROOT / "results"
MODES = ("fixed", "uncertainty")


def ensure_catalog(images: int) -> tuple[str, str]:
    """A synthetic catalog of ``images`` small images, with the regression task when the generator has it."""
    from catalog_tagger.synthetic.catalog import SynthConfig, generate

    out = CACHE / f"catalog_{images}"
    if not (out / "labels.parquet").exists():
        extra = {"regression": True} if "regression" in {f.name for f in dataclasses.fields(SynthConfig)} else {}
        generate(SynthConfig(out=str(out), images=images, seed=0, min_size=128, max_size=256, **extra))
    return str(out / "tasks.yaml"), str(out / "labels.parquet")


def train_one(args: argparse.Namespace, mode: str, seed: int, tasks: str, labels: str) -> dict[str, Any]:
    """Train one model; its test metrics, the learned weights, epochs and seconds."""
    from catalog_tagger.train.config import TrainConfig
    from catalog_tagger.train.pipeline import train

    out = CACHE / f"{mode}_seed{seed}_{args.images}"
    cfg = TrainConfig.parse(
        tasks=tasks, labels=labels, out=str(out), backbone=args.backbone, image_size=args.image_size,
        epochs=args.epochs, patience=args.patience, batch_size=32, lr=3e-3, seed=seed, loss_balance=mode,
        progress=False,
    )  # fmt: skip
    done = out / "training_report.json"
    if not (
        done.exists()
        and json.loads(done.read_text())["config"] == cfg.model_dump(mode="json", exclude={"storage_options"})
    ):
        train(cfg)  # a model trained earlier with the same config is reused
    report = json.loads(done.read_text())
    return {
        "mode": mode,
        "seed": seed,
        "metrics": report["test_metrics"],
        "loss_balance": report["loss_balance"],
        "epochs_run": report["epochs_run"],
        "best_epoch": report["best_epoch"],
        "fit_seconds": report["seconds"]["fit"],
        "split": (out / "split.parquet").read_bytes(),
    }


def headline(tasks: str) -> list[tuple[str, str]]:
    """(task, metric) pairs to compare: every headline metric of every task's kind."""
    from catalog_tagger.config import load_tasks
    from catalog_tagger.kinds import kind_of

    return [(t.name, m) for t in load_tasks(tasks).tasks for m in kind_of(t).headline]


def render(runs: list[dict[str, Any]], pairs: list[tuple[str, str]], seeds: list[int]) -> Table:
    table = Table("task", "metric", *[f"{m} (mean)" for m in MODES], *[f"{m} s{s}" for m in MODES for s in seeds])
    for task, metric in pairs:
        cells: dict[str, list[float | None]] = {
            m: [r["metrics"][task].get(metric) for s in seeds for r in runs if r["mode"] == m and r["seed"] == s]
            for m in MODES
        }
        means = [_fmt(statistics.fmean([v for v in cells[m] if v is not None] or [float("nan")])) for m in MODES]
        table.add_row(task, metric, *means, *[_fmt(v) for m in MODES for v in cells[m]])
    learned = [r for r in runs if r["mode"] == "uncertainty"]
    table.caption = "\n".join(
        f"learned weights (seed {r['seed']}): "
        + ", ".join(f"{k} {v:.3g}" for k, v in r["loss_balance"]["weights"].items())
        for r in learned
    )
    return table


def _fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--image-size", type=int, default=96)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=200)
    tasks, labels = ensure_catalog(args.images)
    runs = []
    for seed in args.seeds:
        for mode in MODES:
            console.print(f"training {mode}, seed {seed} ...")
            runs.append(train_one(args, mode, seed, tasks, labels))
        if runs[-1]["split"] != runs[-2]["split"]:
            raise RuntimeError(f"seed {seed}: the two balances trained on different splits")
    console.print(render(runs, headline(tasks), args.seeds))
    RESULTS.mkdir(exist_ok=True)
    for r in runs:
        r.pop("split")
    payload = {"args": vars(args), "runs": runs, "pairs": headline(tasks)}
    (RESULTS / "loss_balance.json").write_text(json.dumps(payload, indent=2, default=str))
    console.print(f"wrote {RESULTS / 'loss_balance.json'}")


if __name__ == "__main__":
    main()
