"""Predict a handful of images in-process (no Ray): the ``predict`` command and the demo use it."""

from __future__ import annotations

import logging

import fsspec
import numpy as np

from catalog_tagger.decode import decode_image
from catalog_tagger.errors import DecodeError, UserError
from catalog_tagger.inference import output_columns, prepare_for_inference, run_batch, select_device
from catalog_tagger.model import load_artifact

log = logging.getLogger(__name__)


def predict_uris(model_uri: str, uris: list[str], *, device: str = "auto") -> list[dict]:
    """Each image's predictions per task, or its error. Unreadable images do not stop the others."""
    dev = select_device(device)
    model, card = load_artifact(model_uri)
    model = prepare_for_inference(model, dev)
    results: list[dict] = []
    arrays: list[np.ndarray] = []
    ok_idx: list[int] = []
    for uri in uris:
        try:
            with fsspec.open(uri, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise UserError(f"{uri}: no such image") from None
        try:
            dec = decode_image(data, card.image_size)
        except DecodeError as err:
            results.append({"uri": uri, "status": "error", "error": str(err)})
            continue
        ok_idx.append(len(results))
        results.append({"uri": uri, "status": "ok", "width": dec.width, "height": dec.height})
        arrays.append(dec.array)
    if arrays:
        timed = run_batch(model, np.stack(arrays))
        cols = output_columns(card, timed.output)
        for j, i in enumerate(ok_idx):
            preds: dict[str, dict] = {}
            for task in card.task_config().tasks:
                if task.kind == "multiclass":
                    preds[task.name] = {"label": cols[task.name][j], "score": float(cols[f"{task.name}_score"][j])}
                else:
                    preds[task.name] = {
                        "label": list(cols[task.name][j]),
                        "scores": [float(s) for s in cols[f"{task.name}_scores"][j]],
                        "labels": list(task.labels),
                    }
            results[i]["predictions"] = preds
            results[i]["model_version"] = card.version
    return results
