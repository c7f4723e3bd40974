"""`python -m bench.writer`: rows/s of the write stage (Parquet + zstd data files, ``writer.PartWriter``) in Ray
with 1 and with 2 write tasks at once, on the same materialised rows, interleaved, in one run.

The v1 layout wrote every row in the driver (one thread: ~36k rows/s at 576 floats); the v2 write stage runs as
Ray tasks, so it scales with the cores and nodes given to it. Target: 2 write tasks >= 1.6x the rows/s of 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

TARGET = 1.6
EMBEDDING_DIM = 576  # mobilenet_v3_small's embedding: the measured case


def _schema() -> pa.Schema:
    from catalog_tagger.tag import delta

    return pa.schema(
        [
            ("uri", pa.string()),
            ("run_id", pa.string()),
            ("model_version", pa.string()),
            ("status", pa.string()),
            ("garment", pa.string()),
            ("garment_score", pa.float32()),
            (delta.EMBEDDING, pa.list_(pa.field("element", pa.float32()))),
            ("tagged_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def _rows(batch: dict[str, np.ndarray]) -> pa.Table:
    """Predicted rows for the ids in ``batch`` (random embeddings: zstd gets no free ride)."""
    ids = batch["id"]
    n = len(ids)
    rng = np.random.default_rng(int(ids[0]))
    emb = rng.standard_normal((n, EMBEDDING_DIM), dtype=np.float32)
    flat = pa.array(emb.reshape(-1))
    offsets = pa.array(np.arange(0, (n + 1) * EMBEDDING_DIM, EMBEDDING_DIM, dtype=np.int32))
    now = datetime.now(UTC)
    return pa.table(
        {
            "uri": pa.array([f"s3://bucket/catalog/img_{i:09d}.jpg" for i in ids]),
            "run_id": pa.array(["bench"] * n),
            "model_version": pa.array(["m"] * n),
            "status": pa.array(["ok"] * n),
            "garment": pa.array(["shirt"] * n),
            "garment_score": pa.array(rng.random(n, dtype=np.float32)),
            "embedding": pa.ListArray.from_arrays(offsets, flat),
            "tagged_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "_accel_s": pa.array(np.zeros(n)),
            "_single_task_s": pa.array(np.zeros(n)),
            "_decode_s": pa.array(np.zeros(n)),
        }
    )


def _scratch() -> str | None:
    """Where the files go: memory (/dev/shm) when there is one, so the figure is the write stage's encode and
    upload work, not one local disk's fsync queue (on S3 every task uploads over its own connection)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _write(ds: object, tasks: int, rows_per_file: int) -> float:
    """Seconds to write every row of ``ds`` with ``tasks`` write tasks at once (into a fresh folder)."""
    import ray

    from catalog_tagger.tag.writer import PartWriter

    out = tempfile.mkdtemp(prefix="bench-writer-", dir=_scratch())
    try:
        part = PartWriter(out, f"w{tasks}", "2026-11-29", None, _schema())
        t0 = time.perf_counter()
        stats = ds.map_batches(  # type: ignore[attr-defined]
            part,
            batch_format="pyarrow",
            batch_size=rows_per_file,
            num_cpus=0.5,
            compute=ray.data.TaskPoolStrategy(size=tasks),
        )
        written = sum(int(b["rows"].sum()) for b in stats.iter_batches(batch_format="numpy", batch_size=None))
        seconds = time.perf_counter() - t0
        assert written == ds.count(), (written, ds.count())  # type: ignore[attr-defined]
        return seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _write_tasks(tables: list[object], tasks: int) -> float:
    """Seconds for plain Ray tasks (no Ray Data) to write ``tables``, ``tasks`` at a time: the writer's own
    scaling, without Ray Data's scheduling around it."""
    import ray

    from catalog_tagger.tag.writer import PartWriter

    out = tempfile.mkdtemp(prefix="bench-writer-", dir=_scratch())
    try:
        part = PartWriter(out, f"t{tasks}", "2026-11-29", None, _schema())
        write = ray.remote(num_cpus=1)(lambda t: part(t).num_rows)
        t0 = time.perf_counter()
        for i in range(0, len(tables), tasks):
            ray.get([write.remote(t) for t in tables[i : i + tasks]])
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.writer", description=__doc__)
    p.add_argument("--rows", type=int, default=160_000)
    p.add_argument("--rows-per-file", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray Data reserves a share of the cluster for every operator; on this 2-CPU local Ray that caps the only
    # operator here (the write stage) at one task at a time, whatever its concurrency. Measure the write stage,
    # not that reservation (a real cluster has the CPUs).
    ctx.op_resource_reservation_enabled = False
    ds = ray.data.range(args.rows, override_num_blocks=args.rows // 2000).map_batches(_rows, batch_size=2000)
    ds = ds.materialize()  # the rows exist before the clock starts: only the write stage is timed
    tables = [
        ray.put(_rows({"id": np.arange(i, i + args.rows_per_file)})) for i in range(0, args.rows, args.rows_per_file)
    ]
    seconds: dict[int, list[float]] = {1: [], 2: []}
    plain: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for tasks in (1, 2) if r % 2 == 0 else (2, 1):  # interleaved: the machine's noise hits both
            seconds[tasks].append(_write(ds, tasks, args.rows_per_file))
            plain[tasks].append(_write_tasks(tables, tasks))
    rate = {k: args.rows / float(np.median(v)) for k, v in seconds.items()}
    plain_rate = {k: args.rows / float(np.median(v)) for k, v in plain.items()}
    speedup = rate[2] / rate[1]
    verdict = "PASS" if speedup >= TARGET else "FAIL"
    lines = [
        f"write stage, {args.rows} rows x {EMBEDDING_DIM} floats, {args.rows_per_file} rows per file:",
        f"  1 write task : {rate[1]:>10,.0f} rows/s  ({rate[1] * EMBEDDING_DIM * 4 / 2**20:,.0f} MiB/s of floats)",
        f"  2 write tasks: {rate[2]:>10,.0f} rows/s",
        f"  2 vs 1: {speedup:.2f}x (target >= {TARGET}x) {verdict}",
        f"plain Ray tasks, same files: 1 at a time {plain_rate[1]:,.0f} rows/s, 2 at a time {plain_rate[2]:,.0f} "
        f"rows/s: {plain_rate[2] / plain_rate[1]:.2f}x (the writer's own scaling)",
    ]
    print("\n".join(lines))  # noqa: T201 - a bench script's output is its report
    ray.shutdown()
    return 0 if speedup >= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
