"""CPU decoders side by side, per format and size class: speed against Pillow's draft decode, same labels or not.

Every decoder of ``bench/decoders.py`` decodes the same images, interleaved image by image (the order rotated every
image), so a drift of the shared machine hits them alike; each decode is timed in CPU seconds of its thread (one
thread each: torch's set to 1 meanwhile), which other processes on the 2 shared cores do not inflate. Labels and
embeddings of each decoder's arrays are compared with Pillow-draft's through one model. Target: the decoder
``decode_image`` uses (Pillow with JPEG draft) is the fastest one with identical labels (cosine >= 0.99) that the
library may adopt, within the 1.2x margin a switch needs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    LARGE,
    MAIN,
    BenchResult,
    CatalogSpec,
    Check,
    Context,
    at_least,
    ensure_artifact,
    ensure_catalog,
    info,
    median,
    ratio,
    rotated,
    trained_artifact,
)
from bench.decoders import BASELINE, USED, Decoder, candidates

NAME = "decode"
SPEEDUP_TARGET = 2.0  # Pillow-draft vs Pillow full decode, JPEGs >= 1000 px
SWITCH_MARGIN = 1.2  # a decoder replaces the one used only if this much faster, with the same labels
MIN_COSINE = 0.99
CLASSES = {"<1000px": MAIN, ">=1000px": LARGE}
FORMATS = ("jpeg", "png", "webp")
SHARES = {"jpeg": 0.80, "png": 0.12, "webp": 0.08}  # the synthetic catalog's formats


def _per_cell(want: int) -> dict[str, int]:
    """Images per (format, class): a fifth of ``decode_images`` JPEGs, a third as many of the slower PNG / WebP."""
    return {"jpeg": max(4, want // 5), "png": max(2, want // 15), "webp": max(2, want // 15)}


def _pick(spec: CatalogSpec, counts: dict[str, int]) -> dict[str, list[bytes]]:
    """The first ``counts[fmt]`` images of each format in a cached catalog, grown until it has them."""
    total = math.ceil(max(n / SHARES[f] for f, n in counts.items()) * 1.2)
    while True:
        catalog = ensure_catalog(spec, total)
        picked = {f: [i for i in catalog if i.format == f][:n] for f, n in counts.items()}
        if all(len(picked[f]) == n for f, n in counts.items()):
            return {f: [Path(i.uri).read_bytes() for i in imgs] for f, imgs in picked.items()}
        total = math.ceil(total * 1.3)


Arrays = list[np.ndarray | None]


def _time_cell(
    decoders: list[Decoder], blobs: list[bytes], size: int, r: int
) -> tuple[dict[str, float], dict[str, Arrays]]:
    """One round over a cell: seconds per decoder, and each decoder's arrays (None where it refused an image)."""
    secs = {d.name: 0.0 for d in decoders}
    arrays: dict[str, Arrays] = {d.name: [] for d in decoders}
    for k, data in enumerate(blobs):
        for d in rotated(decoders, k + r):
            t0 = time.thread_time()
            try:
                arr: np.ndarray | None = d.decode(data, size)
            except Exception:  # noqa: BLE001 - a decoder that refuses an image is reported, not fatal
                arr = None
            secs[d.name] += time.thread_time() - t0
            arrays[d.name].append(arr)
    return secs, arrays


class _Model:
    """The label check: one model's labels and embeddings for a stack of arrays."""

    def __init__(self, ctx: Context) -> None:
        from catalog_tagger.model.artifact import load_artifact
        from catalog_tagger.model.inference import prepare_for_inference, select_device

        trained = trained_artifact()
        self.uri = trained or ensure_artifact("multi4")
        self.kind = "trained" if trained else "random-init (labels nearly constant: agreement is weak evidence)"
        model, self.card = load_artifact(self.uri)
        self.model = prepare_for_inference(model, select_device("cpu"))
        self.batch, self.threads = ctx.sizes.batch_size, ctx.threads

    def outputs(self, arrays: list[np.ndarray]) -> tuple[Any, list[tuple[str, ...]]]:
        import torch

        from catalog_tagger.model.inference import output_columns, run_batch

        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            stack = np.stack(arrays)
            parts = [run_batch(self.model, stack[i : i + self.batch]).output for i in range(0, len(stack), self.batch)]
        finally:
            torch.set_num_threads(old)
        cols: dict[str, list[Any]] = {}
        for p in parts:
            for k, v in output_columns(self.card, p).items():
                cols.setdefault(k, []).extend(list(v))
        tasks = [t.name for t in self.card.task_config().tasks]
        labels = [tuple(str(cols[t][i]) for t in tasks) for i in range(len(arrays))]
        return torch.cat([p.embedding for p in parts]), labels


def _agreement(model: _Model, base: tuple[Any, list[tuple[str, ...]]], other: Arrays) -> tuple[float, float]:
    """(fraction of images with identical labels on every task, minimum embedding cosine) against the baseline's
    outputs; an image the other decoder refused counts as a disagreement."""
    import torch

    both = [i for i, a in enumerate(other) if a is not None]
    if not both:
        return 0.0, math.nan
    emb, labels = model.outputs([a for a in other if a is not None])
    same = sum(labels[j] == base[1][i] for j, i in enumerate(both))
    cos = torch.nn.functional.cosine_similarity(base[0][both], emb, dim=1)
    return same / len(other), float(cos.min())


def _cell_checks(fmt: str, cls: str, stats: dict[str, dict[str, Any]], decoders: list[Decoder]) -> list[Check]:
    """The cell's rows: Pillow-draft's img/s, every other decoder's ratio against it, and the used-is-fastest check."""
    base = stats[BASELINE]
    rows = [info(f"{fmt} {cls}: {BASELINE} (baseline)", base["img_s"], "img/s", f"{base['n']} images")]
    for d in decoders:
        s = stats.get(d.name)
        if s is None or d.name == BASELINE:
            continue
        note = f"{s['img_s']:.0f} img/s; labels same {s['agree']:.0%}, cos min {s['cos']:.4f}"
        rows.append(info(f"{fmt} {cls}: {d.name} vs {BASELINE}", s["speedup"], "x", note + _barred(d)))
    ok = [d.name for d in decoders if d.eligible() and d.name in stats and _same(stats[d.name])]
    best = max(ok, key=lambda n: stats[n]["img_s"], default=BASELINE)
    used = USED[fmt] if USED[fmt] in stats else BASELINE
    rows.append(
        at_least(
            f"{fmt} {cls}: decoder used / fastest with same labels",
            ratio(stats[used]["img_s"], stats[best]["img_s"]),
            round(1 / SWITCH_MARGIN, 2),
            note=f"used {used}, fastest eligible {best} (cosine >= {MIN_COSINE}, identical labels)",
        )
    )
    return rows


def _same(s: dict[str, Any]) -> bool:
    return bool(s["agree"] == 1.0 and s["cos"] >= MIN_COSINE)


def _barred(d: Decoder) -> str:
    return f"; not eligible ({d.barred})" if d.barred else ""


def run(ctx: Context) -> BenchResult:
    import torch

    s = ctx.sizes
    counts = _per_cell(s.decode_images)
    decoders, notes = candidates()
    res = BenchResult(NAME, {"per_cell": counts, "rounds": s.rounds, "classes": {k: v.key for k, v in CLASSES.items()}})
    res.notes += notes
    model = _Model(ctx)
    size = model.card.image_size
    cells = {(f, c): blobs for c, spec in CLASSES.items() for f, blobs in _pick(spec, counts).items()}
    secs: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in cells}
    first: dict[tuple[str, str], dict[str, Arrays]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchvision's interpolate: one thread, like every other decoder (CPU time = work)
    try:
        for (fmt, _), blobs in cells.items():  # not timed: imports and first-call set-up of every decoder
            _time_cell([d for d in decoders if fmt in d.formats], blobs[:1], size, 0)
        for r in range(s.rounds):
            if not ctx.another_round(r, res.notes):
                break
            for (fmt, cls), blobs in cells.items():
                t, decoded = _time_cell([d for d in decoders if fmt in d.formats], blobs, size, r)
                secs[(fmt, cls)].append(t)
                first.setdefault((fmt, cls), decoded)
            ctx.say(f"{NAME} round {r + 1}/{s.rounds} done")
    finally:
        torch.set_num_threads(threads)
    data: dict[str, Any] = {}
    for (fmt, cls), blobs in cells.items():
        base = model.outputs([a for a in first[(fmt, cls)][BASELINE] if a is not None])  # it refuses none here
        stats: dict[str, dict[str, Any]] = {}
        for name, arrays in first[(fmt, cls)].items():
            rounds = [t[name] for t in secs[(fmt, cls)]]
            agree, cos = (1.0, 1.0) if name == BASELINE else _agreement(model, base, arrays)
            stats[name] = {
                "n": len(blobs),
                "img_s": median([len(blobs) / x for x in rounds]),
                "speedup": median([ratio(t[BASELINE], t[name]) for t in secs[(fmt, cls)]]),
                "agree": agree,
                "cos": cos,
            }
        data[f"{fmt} {cls}"] = stats
        res.checks += _cell_checks(fmt, cls, stats, decoders)
    full = data["jpeg >=1000px"].get("pillow-full")
    if full:
        res.checks.append(at_least("jpeg >=1000px: draft speedup (full s / draft s)", 1 / full["speedup"], 2.0))
    res.data.update(cells=data, model=model.uri, model_kind=model.kind)
    classes = ", ".join(f"{c} = {v.key}" for c, v in CLASSES.items())
    res.notes.append(
        f"decoded to {size} px; img/s = images per CPU-second of one thread; classes {classes}; model {model.kind}"
    )
    return res
