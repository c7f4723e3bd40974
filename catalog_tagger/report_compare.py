"""A model comparison (``compare``'s JSON) as one self-contained, escaped HTML page, in the run report's style.

The page's style is the run report's own (read from ``templates/report.html``, so the two never drift apart)
plus a few rules for the confusion tables (``templates/compare.html``). Every number carries its raw value in a
``data-`` attribute, for scripts and tests.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import string
from datetime import UTC, datetime
from typing import Any

from catalog_tagger.figures import count, duration, num, percent
from catalog_tagger.report_html import _script_json as script_json
from catalog_tagger.report_html import esc

_STYLE = re.compile(r"<style>(.*?)</style>", re.S)


def _template(name: str) -> str:
    return importlib.resources.files("catalog_tagger").joinpath(f"templates/{name}").read_text("utf-8")


def report_style() -> str:
    """The run report's CSS (the one place the look is defined)."""
    found = _STYLE.search(_template("report.html"))
    return found.group(1) if found else ""


def _header(doc: dict[str, Any]) -> str:
    a, b = doc["model_a"], doc["model_b"]
    items = [
        ("A", f"{a['uri']} ({a['version']}, {a['backbone']}, {a['image_size']} px)"),
        ("B", f"{b['uri']} ({b['version']}, {b['backbone']}, {b['image_size']} px)"),
        ("source", doc["source"]),
        ("compared", f"{doc['sample']['compared']:,} images (seed {doc['sample']['seed']})"),
        ("created", doc.get("created_at")),
    ]
    dl = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in items)
    return f"<header><h1>catalog-tagger model comparison</h1><dl>{dl}</dl></header>"


def _detail(t: dict[str, Any]) -> str:
    """The kind's own figure: mean Jaccard (multilabel), MAE / max / RMSE (regression)."""
    if t.get("mean_jaccard") is not None:
        return f"mean Jaccard {num(t['mean_jaccard'], 3)}"
    if t.get("mae") is not None:
        return f"MAE {num(t['mae'], 3)}, max abs diff {num(t['max_abs_diff'], 3)}, RMSE {num(t['rmse'], 3)}"
    return ""


def _summary_section(doc: dict[str, Any]) -> str:
    rows = []
    for t in doc["tasks"]:
        agree = t.get("agreement")
        bar = "" if agree is None else f'<span class="agree"><span style="width:{100 * agree:.1f}%"></span></span>'
        rows.append(
            f'<tr data-task="{esc(t["task"])}"><th scope="row">{esc(t["task"])}</th><td>{esc(t["kind"])}</td>'
            f'<td class="num">{esc(count(t["n"]))}</td>'
            f'<td class="num" data-agreement="{esc(json.dumps(agree))}">{bar}{esc(percent(agree))}</td>'
            f'<td class="num" data-changed="{esc(t.get("changed"))}">{esc(count(t.get("changed")))}</td>'
            f"<td>{esc(_detail(t))}</td></tr>"
        )
    head = "<tr><th>task</th><th>kind</th><th>images</th><th>agreement</th><th>changed</th><th></th></tr>"
    return (
        '<section id="agreement"><h2>Agreement per task</h2>'
        f'<table class="kv"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
        '<p class="note">Agreement: the share of images on which A and B give the same label (multilabel: the same '
        "set of labels). Regression tasks: the error between the two models' values.</p></section>"
    )


def _confusion(t: dict[str, Any]) -> str:
    conf = t["confusion"]
    counts = conf["counts"]
    rows = [i for i, r in enumerate(counts) if any(r)]
    cols = [j for j in range(len(conf["labels_b"])) if any(r[j] for r in counts)]
    top = max((max(r) for r in counts), default=0) or 1
    head = "".join(f'<th scope="col">{esc(conf["labels_b"][j])}</th>' for j in cols)
    body = []
    for i in rows:
        la = conf["labels_a"][i]
        cells = []
        for j in cols:
            n, lb = counts[i][j], conf["labels_b"][j]
            same = ' class="same"' if la == lb else ""
            cells.append(
                f'<td{same} data-label-a="{esc(la)}" data-label-b="{esc(lb)}" data-count="{n}" '
                f'style="background: rgba(47, 111, 219, {0.6 * n / top:.3f})">{n}</td>'
            )
        body.append(f'<tr><th scope="row">{esc(la)}</th>{"".join(cells)}</tr>')
    return (
        f'<div class="confusion-task" data-task="{esc(t["task"])}"><h3>{esc(t["task"])}: A (rows) x B (columns)</h3>'
        f'<table class="confusion"><thead><tr><th>A / B</th>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
        "</table></div>"
    )


def _per_label(t: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><th scope="row">{esc(p["label"])}</th><td class="num" data-agreement="{esc(json.dumps(p["agreement"]))}">'
        f'{esc(percent(p["agreement"]))}</td><td class="num">{esc(count(p["images_a"]))}</td>'
        f'<td class="num">{esc(count(p["images_b"]))}</td></tr>'
        for p in t["per_label"]
    )
    return (
        f'<div data-task="{esc(t["task"])}"><h3>{esc(t["task"])}: agreement per label</h3><table class="kv">'
        "<thead><tr><th>label</th><th>agreement</th><th>images A</th><th>images B</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div>"
    )


def _tasks_section(doc: dict[str, Any]) -> str:
    parts = [_confusion(t) if t.get("confusion") else _per_label(t) for t in doc["tasks"] if t.get("confusion") or
             t.get("per_label")]  # fmt: skip
    if not parts:
        return ""
    title = "<h2>Labels: where A and B differ</h2>"
    return f'<section id="labels">{title}<div class="tasks">{"".join(parts)}</div></section>'


def text_lines(doc: dict[str, Any]) -> list[str]:
    """The sentences around the tables (the terminal's and the page's, word for word): the models, the sample, tasks
    not compared, the timing and the cost."""
    from catalog_tagger.compare_cost import cost_lines

    a, b, s = doc["model_a"], doc["model_b"], doc["sample"]
    lines = [
        f"A: {a['uri']} (version {a['version']}, {a['backbone']}, {a['image_size']} px)",
        f"B: {b['uri']} (version {b['version']}, {b['backbone']}, {b['image_size']} px)",
        f"Sample: {s['compared']:,} image(s) compared of {s['sampled']:,} sampled (seed {s['seed']}, at most "
        f"{s['requested']:,}) from {s['listed_rows']:,} listed in {doc['source']}; decoded once at "
        f"{doc['decode']['image_size']} px.",
    ]
    if s["errors"]:
        shown = "; ".join(f"{e['uri']}: {e['error']}" for e in s["error_examples"][:3])
        lines.append(f"{s['errors']} image(s) could not be read or decoded and are left out: {shown}")
    if s.get("non_finite"):
        lines.append(f"{s['non_finite']} image(s) left out: a model's output was not finite")
    lines.extend(s.get("notes") or [])
    for key, what in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        if doc[key]:
            lines.append(f"Tasks {what} (not compared): {', '.join(doc[key])}")
    for d in doc["kind_differs"]:
        lines.append(f"Task {d['task']} is {d['kind_a']} in A and {d['kind_b']} in B: not compared")
    t = doc.get("timing")
    if t:
        lines.append(
            f"Speed here ({t['device']}, {t['threads']} thread(s), batch {t['batch']}, {t['rounds']} interleaved "
            f"rounds): A {duration(t['a_s_per_image'])}/image, B {duration(t['b_s_per_image'])}/image, B/A "
            f"{t['ratio']:.3f} ({t['ratio_low']:.3f}-{t['ratio_high']:.3f})"
        )
    lines.append(f"Images whose prediction changed: {doc['changed_rows']:,} row(s) (image x task).")
    return [*lines, *cost_lines(doc["cost"])]


def _lines_section(doc: dict[str, Any]) -> str:
    items = "".join(f"<li>{esc(line)}</li>" for line in text_lines(doc))
    examples = doc["sample"].get("error_examples") or []
    errors = "".join(f'<tr><td class="uri">{esc(e["uri"])}</td><td class="reason">{esc(e["error"])}</td></tr>'
                     for e in examples)  # fmt: skip
    table = f'<table class="errors"><tbody>{errors}</tbody></table>' if errors else ""
    return f'<section id="details"><h2>Sample, speed and cost</h2><ul>{items}</ul>{table}</section>'


def render_compare_html(doc: dict[str, Any]) -> str:
    """The page: header, agreement per task, confusion / per-label tables, then the sample, speed and cost."""
    body = "".join(
        [
            _header(doc),
            "<main>",
            _summary_section(doc),
            _tasks_section(doc),
            _lines_section(doc),
            f'<p class="note">Generated {esc(datetime.now(UTC).isoformat(timespec="seconds"))} by catalog-tagger '
            "compare.</p>",
            "</main>",
        ]
    )
    title = f"catalog-tagger comparison: {doc['model_a']['version']} vs {doc['model_b']['version']}"
    return string.Template(_template("compare.html")).substitute(
        title=esc(title), style=report_style(), body=body, data=script_json(doc)
    )


def write_compare_html(doc: dict[str, Any], out: str) -> str:
    """Write the page to ``out`` (path or fsspec URL); returns ``out``."""
    from catalog_tagger.storage import write_bytes_atomic

    write_bytes_atomic(out, render_compare_html(doc).encode("utf-8"))
    return out
