"""The output upkeep commands ``maintain`` and ``migrate``: parse, call ``tag/maintain.py`` / ``tag/migrate.py``,
print a short summary. Registered on the ``catalog-tagger`` app by ``cli.py`` (``register``); errors are
``UserError`` (one line, exit 2) like every command's.

Storage options come from the environment, as for ``tag`` (``AWS_*`` variables, ``AWS_ENDPOINT_URL``, profiles).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

out_console = Console()


def maintain(
    output: Annotated[str, typer.Option("--output", help="Output root (path or fsspec URL).")],
    retention_hours: Annotated[
        float,
        typer.Option(
            "--retention-hours",
            min=0,
            help="Delete unreferenced files only once older than this (default one week; shorter at your own risk: "
            "a run writing for longer loses its files).",
        ),
    ] = 168.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Change nothing; list what would be removed.")] = False,
) -> None:
    """Catch up `latest`, compact small files, vacuum files of crashed runs after the retention, checkpoint."""
    from catalog_tagger.tag.maintain import maintain as run_maintain

    report = run_maintain(output, None, retention_hours=retention_hours, dry_run=dry_run)
    done = "would be " if dry_run else ""
    lines = [
        f"{report.output}{' (dry run)' if dry_run else ''}",
        f"latest: {len(report.merged_runs)} committed run(s) {done}merged",
        f"staging: {len(report.staging_removed)} folder(s) {done}removed",
    ]
    for t in report.tables:
        compacted = "" if dry_run else f"{t.files_compacted} file(s) compacted into {t.files_written}, "
        lines.append(f"{t.name}: {compacted}{len(t.vacuumed)} file(s) {'to vacuum' if dry_run else 'vacuumed'}")
    if report.unstaged_files:
        lines.append(f"{len(report.unstaged_files)} staged file(s) older than the retention: their images re-tag")
    if not report.tables:
        lines.append("no predictions table yet: nothing to maintain")
    out_console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def migrate(output: Annotated[str, typer.Option("--output", help="Output root (path or fsspec URL).")]) -> None:
    """Convert an output in the v1 layout (part files + run manifests) to Delta tables, keeping the v1 files."""
    from catalog_tagger.tag.migrate import migrate as run_migrate

    report = run_migrate(output, None)
    if report.was_v2:
        out_console.print(
            f"{report.output} is already in the Delta (v2) layout", markup=False, highlight=False, soft_wrap=True
        )
        return
    lines = [
        f"{report.output}: {len(report.runs_migrated)} run(s) committed to predictions "
        f"({len(report.runs_already)} already), {report.rows:,} row(s); latest rebuilt",
        f"the v1 files are under {report.backup}: delete it once you are satisfied",
    ]
    out_console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the commands to the ``catalog-tagger`` app."""
    app.command("maintain")(maintain)
    app.command("migrate")(migrate)
