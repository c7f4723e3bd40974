"""Pipeline images/s vs the bare model loop and a plain single-process decode+model loop; Ray start-up cost."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import (
    MAIN,
    BenchResult,
    Context,
    at_least,
    ensure_artifact,
    ensure_catalog,
    info,
    median,
    ratio,
    rotated,
    run_job,
    scratch,
    start_ray,
    write_manifest,
)

NAME = "throughput"
PLAIN_TARGET = 0.9  # bench/README.md targets: pipeline >= 0.9x a plain single-process loop...
BARE_TARGET = 0.8  # ...and >= 0.8x the bare model loop (the product's stretch goal is 0.9x)
LOOP_IMAGES = 384  # the loops are steady state from the first batch: 6 batches of 64 give their rate
ROOT = Path(__file__).resolve().parent.parent


def _load_model(uri: str):
    from catalog_tagger.model.artifact import load_artifact
    from catalog_tagger.model.inference import prepare_for_inference, select_device

    model, card = load_artifact(uri)
    return prepare_for_inference(model, select_device("cpu")), card


def bare_loop(model, images: np.ndarray, batch_size: int) -> float:
    """Forward passes only, on pre-decoded uint8 batches: the ceiling of any pipeline on this machine."""
    from catalog_tagger.model.inference import run_batch

    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        run_batch(model, images[i : i + batch_size])
    return time.perf_counter() - t0


def plain_loop(model, card, uris: list[str], batch_size: int) -> float:
    """What a user would write without Ray: read, decode_image, one forward pass, output columns; sequential."""
    from catalog_tagger.decode import decode_image
    from catalog_tagger.model.inference import output_columns, run_batch

    t0 = time.perf_counter()
    for i in range(0, len(uris), batch_size):
        arrays = []
        for uri in uris[i : i + batch_size]:
            with open(uri, "rb") as fh:
                arrays.append(decode_image(fh.read(), card.image_size).array)
        timed = run_batch(model, np.stack(arrays))
        output_columns(card, timed.output)
    return time.perf_counter() - t0


def thread_settings(plan_threads: int) -> list[int]:
    """Torch threads to try for the loops: 1 and the predictor's plan (which on CPU is 'all cores' here)."""
    return sorted({1, max(1, plan_threads)})


def _loops(model: str, uris: list[str], threads: int, batch_size: int, out: Path) -> dict:
    """Bare + plain loop in a fresh interpreter, as a user script would run, with OMP_NUM_THREADS = threads."""
    args = out / f"loops-{threads}.json"
    args.write_text(json.dumps({"model": model, "uris": uris, "threads": threads, "batch_size": batch_size}))
    # OpenMP reads its thread count at start-up (and per thread): set it before torch loads, as Ray does for
    # its workers (OMP_NUM_THREADS = the task's num_cpus).
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "bench.throughput", "--loops-child", str(args)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return json.loads(args.with_suffix(".out.json").read_text())


def _loops_child(args_path: str) -> None:
    import torch

    from catalog_tagger.decode import decode_image

    a = json.loads(Path(args_path).read_text())
    torch.set_num_threads(a["threads"])
    model, card = _load_model(a["model"])
    uris, bs = a["uris"], a["batch_size"]
    decoded = np.stack([decode_image(Path(u).read_bytes(), card.image_size).array for u in uris])
    bare_loop(model, decoded[:bs], bs)  # warm-up: allocator, oneDNN primitive cache
    c0 = time.process_time()
    bare = bare_loop(model, decoded, bs)
    bare_cpu = time.process_time() - c0
    c0 = time.process_time()
    plain = plain_loop(model, card, uris, bs)
    plain_cpu = time.process_time() - c0
    n = len(uris)
    out = {
        "threads": torch.get_num_threads(),
        "bare": n / bare,
        "plain": n / plain,
        "bare_cpu_per_wall": bare_cpu / bare,
        "plain_cpu_per_wall": plain_cpu / plain,
    }
    Path(args_path).with_suffix(".out.json").write_text(json.dumps(out))


def _startup(model: str, source: str, out: Path, batch_size: int) -> dict:
    """Cold vs warm in a fresh interpreter: imports, Ray start, first run, second run (same Ray)."""
    result = out / "startup.json"
    cmd = [sys.executable, "-m", "bench.throughput", "--startup-child", model, source, str(out), str(batch_size)]
    cmd.append(str(result))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    data = json.loads(result.read_text())
    data["process_s"] = time.perf_counter() - t0
    return data


def _startup_child(model: str, source: str, out: str, batch_size: int, result: str) -> None:
    t0 = time.perf_counter()
    from catalog_tagger.tag import job  # noqa: F401 - timed: the imports a CLI run pays

    import_s = time.perf_counter() - t0
    ray_init_s = start_ray()
    first = run_job(model, source, f"{out}/cold", batch_size=batch_size)
    warm = run_job(model, source, f"{out}/warm", batch_size=batch_size)
    Path(result).write_text(
        json.dumps({"import_s": import_s, "ray_init_s": ray_init_s, "first": first.to_dict(), "warm": warm.to_dict()})
    )


def run(ctx: Context) -> BenchResult:
    s = ctx.sizes
    n, bs = s.throughput_images, s.batch_size
    loop_n = min(n, LOOP_IMAGES)
    res = BenchResult(
        NAME, {"images": n, "loop_images": loop_n, "batch_size": bs, "rounds": s.rounds, "catalog": MAIN.key}
    )
    images = ensure_catalog(MAIN, n)
    uris = [i.uri for i in images]
    model_uri = ensure_artifact("multi4")
    settings = thread_settings(ctx.threads)
    with scratch(NAME) as tmp:
        source = write_manifest(tmp / "manifest.parquet", images)
        kinds = ["pipeline", "pipeline_calibrate", *[f"loops_t{t}" for t in settings]]
        runs: dict[str, list] = {k: [] for k in kinds}
        per_round: list[dict[str, float]] = []
        for r in range(s.rounds):
            if not ctx.another_round(r, res.notes):
                break
            got: dict[str, float] = {}
            for kind in rotated(kinds, r):
                if kind.startswith("pipeline"):
                    jr = run_job(
                        model_uri, source, str(tmp / f"out-{kind}-{r}"), batch_size=bs, calibrate=kind != "pipeline"
                    )
                    runs[kind].append(jr.to_dict())
                    got[kind] = jr.images_per_s
                    got[kind + "_wall"] = ratio(jr.processed, jr.wall_s)
                    got[kind + "_model"] = ratio(jr.processed, jr.accel_s)  # the actor's forward passes alone
                    ctx.say(f"{NAME} round {r + 1}/{s.rounds}: {kind} {got[kind]:.1f} img/s")
                else:
                    t = int(kind.removeprefix("loops_t"))
                    loops = _loops(model_uri, uris[:loop_n], t, bs, tmp)
                    runs[kind].append(loops)
                    got[f"bare_t{t}"], got[f"plain_t{t}"] = loops["bare"], loops["plain"]
                    ctx.say(
                        f"{NAME} round {r + 1}/{s.rounds}: {t} thread(s): bare {loops['bare']:.1f} img/s, "
                        f"plain {loops['plain']:.1f} img/s"
                    )
            # The ceiling is the best thread setting of this round, so a slow setting never flatters the pipeline.
            got["bare"] = max(got[f"bare_t{t}"] for t in settings)
            got["plain"] = max(got[f"plain_t{t}"] for t in settings)
            per_round.append(got)
        res.data.update(runs=runs, per_round=per_round, thread_settings=settings, plan_threads=ctx.threads)
        executors = sorted({str((j.get("resources") or {}).get("executor")) for k in kinds[:2] for j in runs[k]})
        res.notes.append(f"pipeline executor: {', '.join(executors)} (job default executor='auto')")

        def med(key: str) -> float:
            return median([g[key] for g in per_round])

        def rmed(a: str, b: str) -> float:
            # Ratio per round, then the median: both sides of a ratio saw the same minute of machine noise.
            return median([ratio(g[a], g[b]) for g in per_round])

        for t in settings:
            res.checks.append(info(f"bare loop, {t} torch thread(s) (median)", med(f"bare_t{t}"), "img/s"))
            res.checks.append(info(f"plain loop, {t} torch thread(s) (median)", med(f"plain_t{t}"), "img/s"))
        res.checks += [
            info("pipeline (median)", med("pipeline"), "img/s", "ok rows / manifest pipeline_s"),
            info("pipeline, calibrate=True (median)", med("pipeline_calibrate"), "img/s", "the job default"),
            info("model inside the pipeline (N / accel_s)", med("pipeline_model"), "img/s", "actor forward passes"),
            at_least("pipeline / plain loop", rmed("pipeline", "plain"), PLAIN_TARGET, note="calibrate=False"),
            at_least("pipeline / bare model loop", rmed("pipeline", "bare"), BARE_TARGET, note="calibrate=False"),
            at_least(
                "pipeline / plain loop (job default)",
                rmed("pipeline_calibrate", "plain"),
                PLAIN_TARGET,
                note="calibrate=True",
            ),
            at_least(
                "pipeline / bare loop (job default)",
                rmed("pipeline_calibrate", "bare"),
                BARE_TARGET,
                note="calibrate=True",
            ),
            at_least(
                "job.run wall / plain loop (end to end)",
                rmed("pipeline_wall", "plain"),
                PLAIN_TARGET,
                note="incl. validate, list, commit",
            ),
            info("plain / bare", rmed("plain", "bare"), "x", "decode share of a sequential loop"),
        ]
        ctx.say(f"{NAME}: Ray start-up in a fresh process ({s.startup_images} images, cold then warm)")
        startup = _startup(model_uri, write_manifest(tmp / "startup.parquet", images[: s.startup_images]), tmp, bs)
        res.data["startup"] = startup
        first, warm = startup["first"]["wall_s"], startup["warm"]["wall_s"]
        res.checks += [
            info("imports (catalog_tagger.job)", startup["import_s"], "s"),
            info("ray.init (local)", startup["ray_init_s"], "s"),
            info(f"first job.run, {s.startup_images} images", first, "s"),
            info(f"second job.run, {s.startup_images} images (warm Ray)", warm, "s"),
            info("start-up cost: ray.init + (first - warm)", startup["ray_init_s"] + first - warm, "s"),
        ]
    res.notes.append(
        f"bare/plain loops: {loop_n} images in a fresh interpreter per thread setting {settings} (OMP_NUM_THREADS "
        f"= torch threads), batch {bs}; 'bare'/'plain' in the ratios = the round's best setting. The predictor's "
        f"plan asks {ctx.threads} torch threads; pipeline images/s = ok rows / manifest pipeline_s"
    )
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--startup-child", nargs=5, metavar=("MODEL", "SOURCE", "OUT", "BATCH", "RESULT"))
    p.add_argument("--loops-child", metavar="ARGS_JSON")
    args = p.parse_args()
    if args.startup_child:
        model, source, out, batch, result = args.startup_child
        _startup_child(model, source, out, int(batch), result)
    elif args.loops_child:
        _loops_child(args.loops_child)


if __name__ == "__main__":
    main()
