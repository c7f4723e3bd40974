"""The flows' Prefect artifacts under stable keys: the savings and summary of a tagging run, a training's metrics.

Keys: ``{kind}-savings-{slug}`` (table: every savings number, raw, so dashboards can read them back) and
``{kind}-summary-{slug}`` (markdown), ``kind`` being ``nightly`` or ``backfill`` and ``slug`` the output's
(``output_slug``: two catalogs never share a key, so each keeps its own history); ``train-metrics`` and
``train-summary``; ``train-promotion-{slug}`` (markdown: the promotion gate's comparison, slug of the current model
location) and ``train-promotion-table-{slug}`` (the same rows, raw).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from catalog_tagger.figures import savings_keys, savings_notes, savings_rows, timing_rows
from catalog_tagger.render import TRAIN_METRICS
from catalog_tagger.storage import redact

_SLUG_TAIL = 32  # characters of the output's readable tail in a slug (keys and resource ids stay short)


def output_slug(output: str) -> str:
    """A stable id of an output root for artifact keys and event resources: lowercase letters, digits and dashes,
    the location's last path segments (readable) plus a hash of the whole location (unique), at most 41 chars.

    ``s3://bucket/catalogs/museum/out/`` -> ``museum-out-<8 hex>``; trailing slashes do not change it.
    """
    # no credentials in a key: user info and query strings (signed URLs) are left out of both parts
    location = re.split(r"[?#]", redact(output.strip()), maxsplit=1)[0].rstrip("/") or "/"
    digest = hashlib.blake2b(location.encode(), digest_size=4).hexdigest()
    path = location.split("://", 1)[-1].rsplit("@", 1)[-1]
    tail = re.sub(r"[^a-z0-9]+", "-", "-".join(path.lower().split("/")[-2:])).strip("-")
    tail = tail[-_SLUG_TAIL:].strip("-")
    return f"{tail}-{digest}" if tail else digest


def artifact_key(kind: str, what: str, output: str) -> str:
    """``{kind}-{what}-{slug}``: e.g. ``nightly-savings-museum-out-1a2b3c4d``."""
    return f"{kind}-{what}-{output_slug(output)}"


def savings_table(savings: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the table artifact: every number of the manifest's savings (ranges too), unformatted."""
    labels = {key: label for key, label, _, _ in savings_rows(savings, details=True)}
    rows = []
    for key in savings_keys():
        if key in savings:
            base = key.removesuffix("_low").removesuffix("_high")
            bound = key[len(base) + 1 :]
            label = labels.get(base, base) + (f" ({bound} end of its range)" if bound else "")
            rows.append({"metric": label, "key": key, "value": savings[key]})
    return rows


def summary_markdown(kind: str, result: dict[str, Any], report_uri: str | None, path: str, when: str) -> str:
    """A tagging run in a few lines: counts, where it ran, the savings, the manifest and report, the notes."""
    m = result["manifest"]
    lines = [
        f"# {kind.capitalize()} tagging {when}: run `{result['run_id']}`",
        "",
        "| | |",
        "|---|---|",
        f"| images listed | {result['listed']:,} |",
        f"| unchanged (skipped) | {result['unchanged']:,} |",
        f"| tagged ok | {result['ok']:,} |",
        f"| errors | {result['error']:,} |",
        f"| Ray | {path} |",
    ]
    if m is not None:
        lines += [f"| {label} | {shown} |" for _, label, shown, _ in timing_rows(m.get("timings") or {})]
        lines += ["", "## Accelerator-hours saved: one multi-head model vs one model per task", ""]
        lines += ["| | |", "|---|---|"]
        lines += [f"| {label} | {shown} |" for _, label, shown, _ in savings_rows(m["savings"])]
        lines += ["", *[f"- {n}" for n in savings_notes(m)]]
        manifest_uri = f"{result['output']}/runs/{result['run_id']}.json"
        lines += ["", f"Model version `{m['model_version']}`; manifest `{manifest_uri}`."]
    else:
        lines += ["", "Nothing was committed: no new or changed images."]
    if report_uri:
        lines += ["", f"HTML report: `{report_uri}`"]
    if result["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def publish_run(kind: str, result: dict[str, Any], report_uri: str | None, path: str, when: str) -> None:
    """``{kind}-savings-{slug}`` (only when the run committed) and ``{kind}-summary-{slug}``."""
    if result["manifest"] is not None:
        create_table_artifact(
            key=artifact_key(kind, "savings", result["output"]),
            table=savings_table(result["manifest"]["savings"]),
            description=f"Savings of run {result['run_id']} ({when}): one multi-head model vs one model per task",
        )
    create_markdown_artifact(
        key=artifact_key(kind, "summary", result["output"]),
        markdown=summary_markdown(kind, result, report_uri, path, when),
        description=f"Summary of {kind} tagging run {result['run_id']}",
    )


def metrics_table(metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, headline metric) of a trained model's test metrics."""
    return [
        {"task": name, "metric": k, "value": m[k]}
        for name, m in metrics.items()
        for k in TRAIN_METRICS
        if m.get(k) is not None
    ]


def publish_training(result: dict[str, Any]) -> None:
    """``train-metrics`` (test metrics) and ``train-summary`` (what was trained, on how much, how fast)."""
    create_table_artifact(
        key="train-metrics", table=metrics_table(result["metrics"]), description=f"Test metrics of {result['out']}"
    )
    md = [
        f"# Trained `{result['out']}` (version `{result['model_version']}`)",
        "",
        f"{result['images_used']:,} images ({result['skipped']} skipped), best epoch {result['best_epoch']}/"
        f"{result['epochs_run']}, {result['seconds']:.0f} s.",
    ]
    if result["comparison"]:
        c = result["comparison"]
        md.append(f"Measured multi-head vs {c['n_tasks']} single-task models: cost ratio {c['cost_ratio']:.2f}x.")
    create_markdown_artifact(key="train-summary", markdown="\n".join(md) + "\n")


PROMOTION_HEADER = ("task", "metric", "current", "new", "change", "verdict")


def promotion_markdown(promotion: dict[str, Any]) -> str:
    """The gate's decision and its comparison table (same test images, each task's headline metric)."""
    from catalog_tagger.train.promote import comparison_rows  # torch: only the training flow gets here

    title = "Promoted" if promotion["promoted"] else "Not promoted"
    lines = [
        f"# {title}: `{promotion['new_version']}` -> `{promotion['promote_to']}`",
        "",
        promotion["message"],
        "",
        f"Current model `{promotion['current_version']}`; tolerance {promotion['tolerance']:g} (absolute, on each "
        f"task's headline metric); {promotion['test_images']} test images of the new run.",
    ]
    rows = comparison_rows(promotion)
    if rows:
        lines += ["", "| " + " | ".join(PROMOTION_HEADER) + " |", "|" + "---|" * len(PROMOTION_HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def publish_promotion(promotion: dict[str, Any]) -> None:
    """``train-promotion-{slug}`` (markdown) and ``train-promotion-table-{slug}`` (one row per task, raw values)."""
    where = promotion["promote_to"]
    create_markdown_artifact(
        key=artifact_key("train", "promotion", where),
        markdown=promotion_markdown(promotion),
        description=f"Promotion gate of {promotion['new_version']} to {where}",
    )
    table = [
        {k: t[k] for k in ("task", "metric", "current", "new", "change", "higher_is_better", "verdict", "refuses")}
        for t in promotion["tasks"]
    ]
    if table:
        create_table_artifact(
            key=artifact_key("train", "promotion-table", where),
            table=table,
            description=f"Promotion gate of {promotion['new_version']}: current vs new model on the same test split",
        )
