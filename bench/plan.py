"""`python -m bench.plan [--sizes 100000 1000000]`: the driver's peak memory while planning (``tag --plan-only``).

For each size N: a Parquet manifest of N uris with ``size``/``etag`` columns, and an output whose committed state
(``OUT/latest``, a Delta table with the latest columns) holds the same N uris, half of them with the same ETag
(unchanged) and half with another (changed). ``plan.preview`` (listing streamed into the out-of-core diff, nothing
written to the output) runs in a fresh subprocess per size, which reports its own peak RSS (``VmHWM``), and
the RSS its imports alone reach (torch, through the job's config: about half a gigabyte).

Targets (issue 12): peak RSS at most 1.5 GB at 10^6 uris, and at most 2x from 10^5 to 10^6.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import deltalake  # before pyarrow.parquet (see the rules on import order)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog_tagger.config import TaskConfig
from catalog_tagger.tag import delta

DIM = 8
MAX_PEAK_MB = 1500.0  # at the largest size
MAX_RATIO = 2.0  # peak RSS of the largest size over the smallest
TASKS = TaskConfig.model_validate(
    {
        "tasks": [
            {"name": "category", "kind": "multiclass", "labels": ["dress", "shirt", "shoe", "bag", "hat"]},
            {"name": "style", "kind": "multilabel", "labels": ["plain", "striped", "dotted", "logo"]},
        ]
    }
)

_CHILD = """
import json, sys, time
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.plan import preview
def peak_mb():  # VmHWM: this process's peak RSS (ru_maxrss would keep the forking parent's)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
base = peak_mb()
t0 = time.perf_counter()
p = preview(TagJobConfig(model=sys.argv[1], source=sys.argv[2], output=sys.argv[3]))
print(json.dumps({"listed": p.listed, "new": p.new, "changed": p.changed, "unchanged": p.unchanged,
                  "seconds": time.perf_counter() - t0, "base_mb": base,
                  "peak_mb": peak_mb()}))
"""


def _model(folder: Path) -> tuple[str, str]:
    """A tiny artifact for TASKS (the plan only reads its card): (path, model version)."""
    from catalog_tagger.model.artifact import card_for, load_card, save_artifact
    from catalog_tagger.model.multihead import build_model

    model = build_model(backbone="tiny_cnn", tasks=TASKS)
    save_artifact(model, card_for(model, image_size=32), folder)
    return str(folder), load_card(folder).version


CHUNK = 1_000_000  # rows made at once


def _chunks(n: int) -> Iterator[np.ndarray]:
    for start in range(0, n, CHUNK):
        yield np.arange(start, min(n, start + CHUNK))


def _uris(idx: np.ndarray) -> pa.Array:
    return pa.array(np.char.add(np.char.add("s3://catalog/images/", idx.astype("U10")), ".jpg"))


def _latest_rows(idx: np.ndarray, version: str, schema: pa.Schema) -> pa.Table:
    """Rows of ``latest`` for images ``idx``, of this model version, with ETag ``e<i>``."""
    n = len(idx)
    when = np.datetime64(datetime(2025, 1, 1), "us")
    rng = np.random.default_rng(int(idx[0]))
    uris = _uris(idx)
    data = {
        "uri": uris,
        "size": pa.array(np.full(n, 1000, np.int64)),
        "etag": pa.array(np.char.add("e", idx.astype("U10"))),
        "mtime": pa.array(np.full(n, when)),
        "content_hash": uris,
        "run_id": pa.array(np.full(n, "bench-run")),
        "model_version": pa.array(np.full(n, version)),
        "status": pa.array(np.full(n, "ok")),
        "error": pa.nulls(n, pa.string()),
        "width": pa.array(np.full(n, 640, np.int32)),
        "height": pa.array(np.full(n, 480, np.int32)),
        "category": pa.array(np.full(n, "dress")),
        "category_score": pa.array(rng.random(n, np.float32)),
        "style": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.array(np.full(n, "plain"))),
        "style_scores": pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * 4), pa.array(rng.random(n * 4, np.float32))
        ),
        "tagged_at": pa.array(np.full(n, when)),
    }
    return pa.table({f.name: data[f.name] for f in schema}).cast(schema)


def _latest(output: str, n: int, version: str) -> None:
    """``OUT/latest`` with n rows of this model version, written in one Delta commit."""
    schema = delta.latest_schema(delta.predictions_schema(TASKS, DIM))
    batches = (b for idx in _chunks(n) for b in _latest_rows(idx, version, schema).to_batches())
    rows = pa.RecordBatchReader.from_batches(schema, batches)
    deltalake.write_deltalake(delta.table_uri(output, delta.LATEST), rows)


def _manifest(path: Path, n: int) -> None:
    """n uris with size/etag: the even ones keep their committed ETag, the odd ones have another."""
    with pq.ParquetWriter(path, pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string())])) as w:
        for idx in _chunks(n):
            etags = np.where(idx % 2 == 0, np.char.add("e", idx.astype("U10")), np.char.add("new-", idx.astype("U10")))
            w.write_table(pa.table({"uri": _uris(idx), "size": np.full(len(idx), 1000, np.int64), "etag": etags}))


def measure(n: int, model: str, version: str, folder: Path) -> dict[str, float]:
    out, manifest = folder / f"out-{n}", folder / f"manifest-{n}.parquet"
    t0 = time.perf_counter()
    _latest(str(out), n, version)
    _manifest(manifest, n)
    setup_s = time.perf_counter() - t0
    r = subprocess.run([sys.executable, "-c", _CHILD, model, str(manifest), str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"preview failed at {n}: {r.stderr[-2000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["listed"], got["unchanged"], got["changed"]) == (n, (n + 1) // 2, n // 2), got
    return {**got, "setup_s": setup_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[100_000, 1_000_000], metavar=("N", "N10"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        folder = Path(tmp)
        model, version = _model(folder / "model")
        rows = [measure(n, model, version, folder) for n in args.sizes]
    lines = [
        f"plan-only (python -m bench.plan, {datetime.now(UTC):%Y-%m-%d})",
        f"{'uris':>10} {'listed':>10} {'changed':>10} {'unchanged':>10} {'plan s':>8} "
        f"{'peak RSS MB':>12} {'imports MB':>11}",
    ]
    for n, r in zip(args.sizes, rows, strict=True):
        lines.append(f"{n:>10,} {r['listed']:>10,} {r['changed']:>10,} {r['unchanged']:>10,} {r['seconds']:>8.1f} "
                     f"{r['peak_mb']:>12.0f} {r['base_mb']:>11.0f}")  # fmt: skip
    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    ok = rows[1]["peak_mb"] <= MAX_PEAK_MB and ratio <= MAX_RATIO
    lines.append(f"peak RSS ratio for {args.sizes[1] / args.sizes[0]:g}x the uris: {ratio:.2f}x (target <= "
                 f"{MAX_RATIO}); largest {rows[1]['peak_mb']:.0f} MB (target <= {MAX_PEAK_MB:.0f}): "
                 f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
    print("\n".join(lines))  # noqa: T201 - a bench script's output is its report
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
