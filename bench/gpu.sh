#!/usr/bin/env bash
# The one script a GPU machine runs: the accelerator section of the bench (bench/gpu.py), without internet.
#
#   bench/gpu.sh                  needs an NVIDIA GPU; figures to $OUT/gpu-bench.json (+ .txt summary, .log console)
#                                 or, with OUT unset, bench/results/gpu-<stamp>.json
#   bench/gpu.sh --dry-run-cpu    the same harness on CPU with tiny sizes (no GPU needed)
#
# Further arguments go to `python -m bench.gpu` (--images N, --models a,b, --batch-size B, --no-compile).
# Environment: GPU_BENCH_TIMEOUT_S (default 420: the section's ~6 min and a margin), PYTHON (an interpreter to try
# first), WHEELHOUSE (a folder of wheels to install missing packages from; default shared/wheels if present),
# NVIDIA_SMI (default nvidia-smi).
# Python: .venv if it works; else a venv (bench/.cache/venv-gpu, gitignored) with --system-site-packages over the
# first interpreter whose torch sees CUDA, the project installed with --no-deps; nothing is ever downloaded: what is
# missing is named instead.
# Exit: 0 done, 1 the section crashed, 2 cannot run here (one line on stderr), 124 timed out (partial JSON kept).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

die() {
    echo "gpu.sh: $*" >&2
    exit 2
}

dry=0
for arg in "$@"; do [[ "$arg" == "--dry-run-cpu" ]] && dry=1; done

# ---------------------------------------------------------------------------------------------------- the GPU
gpu="cpu (dry run)"
if ((!dry)); then
    smi="${NVIDIA_SMI:-nvidia-smi}"
    command -v "$smi" >/dev/null 2>&1 || die "no $smi: no NVIDIA GPU or driver here (bench/gpu.sh --dry-run-cpu tests the harness on CPU)"
    gpu="$("$smi" --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
    [[ -n "$gpu" ]] || die "$smi lists no GPU"
fi

# ---------------------------------------------------------------------------------------------------- python
usable() { # $1: Python >= 3.11 whose torch imports and, unless this is a dry run, sees CUDA
    "$1" -c "import sys, torch; sys.exit(0 if sys.version_info >= (3, 11) and ($dry or torch.cuda.is_available()) else 1)" \
        >/dev/null 2>&1
}

missing() { # $1: python; prints what the section imports and this environment lacks, "; "-separated
    "$1" - <<'EOF'
import importlib

MODULES = ["torch", "torchvision", "numpy", "PIL", "pyarrow", "ray", "ray.data", "deltalake", "duckdb", "pydantic",
           "yaml", "safetensors", "fsspec", "rich", "psutil", "catalog_tagger.tag.job", "bench.gpu"]
gone = []
for name in MODULES:
    try:
        importlib.import_module(name)
    except Exception as err:  # an ImportError, or a broken package: both stop the section
        gone.append(f"{name} ({type(err).__name__}: {err})")
print("; ".join(gone))
EOF
}

venv=bench/.cache/venv-gpu
wheelhouse="${WHEELHOUSE:-}"
[[ -z "$wheelhouse" && -d shared/wheels ]] && wheelhouse=shared/wheels

py=""
for cand in .venv/bin/python "$venv/bin/python"; do
    if [[ -x "$cand" ]] && usable "$cand"; then py="$cand" && break; fi
done
if [[ -z "$py" ]]; then
    tried=()
    for name in ${PYTHON:-} python3 python3.13 python3.12 python3.11 python /opt/conda/bin/python; do
        sys_py="$(command -v "$name" 2>/dev/null)" || continue
        tried+=("$sys_py")
        usable "$sys_py" || continue
        echo "gpu.sh: creating $venv over $sys_py (--system-site-packages: its torch, no download)"
        if "$sys_py" -m venv --system-site-packages "$venv" && usable "$venv/bin/python"; then
            py="$venv/bin/python"
        else # $sys_py is itself a venv: a venv over it does not see its packages; use it as it is
            rm -rf "$venv"
            py="$sys_py"
            echo "gpu.sh: using $sys_py itself, nothing installed into it (the checkout is on its path)"
        fi
        break
    done
    [[ -n "$py" ]] || die "no Python >= 3.11 here has torch$( ((dry)) || echo ' with CUDA') (tried: ${tried[*]:-none}); install one, or set PYTHON"
    if [[ "$py" == "$venv/bin/python" ]]; then
        if [[ -n "$wheelhouse" ]]; then
            "$py" -m pip install -q --no-index --find-links "$wheelhouse" -e . >/dev/null 2>&1 ||
                echo "gpu.sh: pip install from $wheelhouse failed; checking what is there"
        fi
        "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 ||
            echo "gpu.sh: project not installed (pip install --no-deps -e . failed); running from the checkout"
    fi
fi
gone="$(missing "$py")"
if [[ -n "$gone" && -n "$wheelhouse" && "$py" == "$venv/bin/python" ]]; then
    "$py" -m pip install -q --no-index --find-links "$wheelhouse" -e . >/dev/null 2>&1
    gone="$(missing "$py")"
fi
[[ -z "$gone" ]] || die "$py lacks (no internet here, nothing downloaded): $gone; put wheels in a folder and rerun with WHEELHOUSE=<folder>"

# ---------------------------------------------------------------------------------------------------- the run
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
limit="${GPU_BENCH_TIMEOUT_S:-420}"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT" || die "cannot create OUT=$OUT"
    json="$OUT/gpu-bench.json"
else
    mkdir -p bench/results
    json="bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ).json"
fi
versions="$("$py" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")')"
nvml="$("$py" -c 'import pynvml' >/dev/null 2>&1 && echo yes || echo 'no (nvidia-ml-py not installed)')"
echo "gpu.sh: GPU $gpu; $py ($versions); NVML $nvml; limit ${limit}s; figures -> $json"

# The console goes to a log file, shown as it grows: a pipe to tee could be held open by Ray's processes.
log="${json%.json}.log"
timeout -k 20 "$limit" "$py" -m bench.gpu --out "$json" "$@" >"$log" 2>&1 &
pid=$!
tail -n +1 -f --pid="$pid" "$log"
wait "$pid"
rc=$?
if ((rc == 124 || rc == 137)); then
    echo "gpu.sh: timed out after ${limit}s; partial figures in $json (\"complete\": false)" | tee -a "${json%.json}.txt" >&2
    exit 124
fi
exit "$rc"
