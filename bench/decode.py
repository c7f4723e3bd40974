"""decode_image (JPEG draft) vs decode_full on JPEGs >= 1000 px: speed, pixel difference, label agreement."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from bench.common import (
    LARGE,
    BenchResult,
    Context,
    at_least,
    ensure_artifact,
    ensure_catalog,
    info,
    median,
    ratio,
    trained_artifact,
)

NAME = "decode"
SPEEDUP_TARGET = 2.0
MIN_SIDE = 1000
JPEG_SHARE = 0.8  # synthetic catalogs are ~80% JPEG


def _labels(card, cols: dict, i: int) -> tuple:
    out = []
    for task in card.task_config().tasks:
        v = cols[task.name][i]
        out.append(tuple(v) if isinstance(v, list) else v)
    return tuple(out)


def run(ctx: Context) -> BenchResult:
    import torch

    from catalog_tagger.decode import decode_full, decode_image
    from catalog_tagger.model.artifact import load_artifact
    from catalog_tagger.model.inference import output_columns, prepare_for_inference, run_batch, select_device

    s = ctx.sizes
    want = s.decode_images
    res = BenchResult(NAME, {"jpegs": want, "min_side": MIN_SIDE, "rounds": s.rounds, "catalog": LARGE.key})
    total = math.ceil(want / JPEG_SHARE * 1.15)
    while True:
        catalog = ensure_catalog(LARGE, total)
        picked = [i for i in catalog if i.format == "jpeg" and min(i.width, i.height) >= MIN_SIDE][:want]
        if len(picked) == want:
            break
        total = math.ceil(total * 1.3)
    blobs = [Path(i.uri).read_bytes() for i in picked]
    trained = trained_artifact()
    model_uri = trained or ensure_artifact("multi4")
    model, card = load_artifact(model_uri)
    model = prepare_for_inference(model, select_device("cpu"))
    size = card.image_size

    # Interleaved per image, order flipped every other image; decoding is single-threaded, so wall = CPU here.
    t_draft: list[list[float]] = []
    t_full: list[list[float]] = []
    for r in range(s.rounds):
        if not ctx.another_round(r, res.notes):
            break
        td, tf = [], []
        for k, data in enumerate(blobs):
            for which in ("draft", "full") if (k + r) % 2 == 0 else ("full", "draft"):
                t0 = time.perf_counter()
                if which == "draft":
                    decode_image(data, size)
                    td.append(time.perf_counter() - t0)
                else:
                    decode_full(data, size)
                    tf.append(time.perf_counter() - t0)
        t_draft.append(td)
        t_full.append(tf)
        ctx.say(
            f"{NAME} round {r + 1}/{s.rounds}: draft {len(td) / sum(td):.0f} img/s, full {len(tf) / sum(tf):.0f} img/s"
        )
    speedups = [ratio(sum(f), sum(d)) for d, f in zip(t_draft, t_full, strict=True)]

    draft = np.stack([decode_image(b, size).array for b in blobs])
    full = np.stack([decode_full(b, size) for b in blobs])
    pixel_diff = np.abs(draft.astype(np.int16) - full.astype(np.int16)).mean(axis=(1, 2, 3))
    old = torch.get_num_threads()
    torch.set_num_threads(ctx.threads)
    try:
        outs = []
        for arr in (draft, full):
            parts = [run_batch(model, arr[i : i + s.batch_size]).output for i in range(0, len(arr), s.batch_size)]
            emb = torch.cat([p.embedding for p in parts])
            cols: dict = {}
            for p in parts:
                for k, v in output_columns(card, p).items():
                    cols.setdefault(k, []).extend(list(v))
            outs.append((emb, cols))
    finally:
        torch.set_num_threads(old)
    (e1, c1), (e2, c2) = outs
    same_all = [_labels(card, c1, i) == _labels(card, c2, i) for i in range(len(blobs))]
    cos = torch.nn.functional.cosine_similarity(e1, e2, dim=1)
    kind = "trained" if trained else "random-init (labels nearly constant: agreement is weak evidence)"
    res.data.update(
        draft_img_s=[len(d) / sum(d) for d in t_draft],
        full_img_s=[len(f) / sum(f) for f in t_full],
        speedups=speedups,
        per_image_speedup_median=median([f / d for d, f in zip(t_draft[0], t_full[0], strict=True)]),
        model=model_uri,
        model_kind=kind,
        label_agreement_per_task={
            t.name: float(np.mean([a == b for a, b in zip(c1[t.name], c2[t.name], strict=True)]))
            for t in card.task_config().tasks
        },
        distinct_label_tuples=len({_labels(card, c1, i) for i in range(len(blobs))}),
    )
    res.checks += [
        info("draft decode (median)", median(res.data["draft_img_s"]), "img/s"),
        info("full decode + resize (median)", median(res.data["full_img_s"]), "img/s"),
        at_least("draft speedup (full s / draft s)", median(speedups), SPEEDUP_TARGET),
        info("identical labels, all tasks (fraction)", float(np.mean(same_all)), "", f"model: {kind}"),
        info("embedding cosine, draft vs full (min)", float(cos.min()), ""),
        info("mean abs pixel difference (0-255, mean)", float(pixel_diff.mean()), ""),
    ]
    res.notes.append(
        f"{want} synthetic JPEGs, sides {MIN_SIDE}-{LARGE.max_size} px, decoded to {size} px; model {kind}"
    )
    if not trained:
        res.notes.append(
            "no trained model: set CATALOG_TAGGER_BENCH_MODEL or train one into bench/.cache/model "
            "(catalog-tagger train ... --out bench/.cache/model) for a meaningful label check"
        )
    return res
