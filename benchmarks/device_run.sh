#!/usr/bin/env bash
# What the GPU machine runs (the device `run` tool, with carry [".whl"] after bash benchmarks/device_wheels.sh
# here; benchmarks/RESULTS.md, "running the GPU stages", has the one-call recipe):
#   bash benchmarks/device_run.sh [STAGES] [more benchmarks/gpu.py arguments]
# STAGES: comma-separated gpu.py stages, default train,lowmem,compile,fp8 (those not measured on a GPU yet;
# gpu.py runs them in its own order whatever the order given). Installs .whl/*.whl into $SITE, and the
# wheels of .whl/if-missing only where the image lacks the package or has it too old; prints the versions;
# checks bitsandbytes' nf4 on the GPU (if it fails, gpu.py trains that row on fp8, its own fallback); runs
# gpu.py with --out $OUT/RESULTS-gpu.md (rewritten after each stage, so a stop keeps what finished) and
# --budget-s from what is left of LIMIT_S; everything printed also goes to $OUT/gpu.log.
# Environment: OUT (set by the tool; required), PYTHON (python3), SITE (/tmp/site), LIMIT_S (590: keep it
# under the run's timeout_s), BUDGET_S (default: LIMIT_S less the time used before gpu.py, less 30 s),
# DEVICE_TINY=1 (a CPU dry run: --tiny --device cpu, e.g. OUT=/tmp/out PYTHON=.venv/bin/python).
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.." || exit
: "${OUT:?OUT: the folder whose files come back}"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
LIMIT_S=${LIMIT_S:-590}
TINY=${DEVICE_TINY:-0}
STAGES=train,lowmem,compile,fp8
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then STAGES=$1; shift; fi
mkdir -p "$OUT"

install() {  # one pip call: .whl/*.whl, and of .whl/if-missing what the image lacks or has too old
    local missing wheels
    missing=$("$PY" - .whl/if-missing/*.whl <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import Version

AT_LEAST = {"huggingface_hub": "1.32", "protobuf": "6.31.1"}  # diffusers 0.42; tensorboard 2.21
for wheel in sys.argv[1:]:
    name = Path(wheel).name.split("-")[0]
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(AT_LEAST.get(name, "0")):
        print(wheel)
        print(f"{name}: image has {have or 'none'}; installing {Path(wheel).name.split('-')[1]}", file=sys.stderr)
EOF
) || return 1
    wheels=(.whl/*.whl)
    [ ${#wheels[@]} -gt 0 ] || return 1
    [ -n "$missing" ] && mapfile -t -O ${#wheels[@]} wheels <<<"$missing"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
}

preflight() {  # versions; diffusers must import; bitsandbytes' nf4 must run on this GPU, else it is hidden
    "$PY" - "$TINY" "$SITE" <<'EOF'
import importlib
import sys
from importlib.metadata import version
from pathlib import Path

import torch

tiny, site = sys.argv[1] == "1", Path(sys.argv[2])
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()}, compute capability {torch.cuda.get_device_capability()}")
for name in ("diffusers", "torchao", "bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub",
             "tensorboard", "protobuf"):
    try:
        print(f"  {name} {version(name)}")
    except Exception as exc:
        print(f"  {name}: {type(exc).__name__} {exc}")
from diffusers import FluxPipeline  # noqa: F401  (every stage needs it: fail here, not in each stage)

for module in ("torchao.quantization", "torch.utils.tensorboard"):
    try:
        importlib.import_module(module)
    except Exception as exc:
        print(f"WARNING: import {module}: {type(exc).__name__}: {exc} (the stages that use it will fail)")
if not tiny and (site / "bitsandbytes").is_dir():
    try:
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(256, 256, compute_dtype=torch.bfloat16, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(torch.randn(256, 256, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4")
        y = q.to("cuda")(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16))
        torch.cuda.synchronize()
        print(f"bitsandbytes nf4 runs here ({tuple(y.shape)})")
    except Exception as exc:
        print(f"WARNING: bitsandbytes nf4 fails here ({type(exc).__name__}: {exc}); hidden, so gpu.py's lowmem "
              "trains its block-swap row on fp8 instead of nf4")
        (site / "bitsandbytes").rename(site / "bitsandbytes.off")
EOF
}

main() {
    echo "device_run.sh: stages $STAGES; $(date -u +%FT%TZ); $(hostname)"
    rm -rf "$SITE/bitsandbytes.off"
    install || { echo "device_run.sh: installing the wheels failed (bash benchmarks/device_wheels.sh first?)"; return 3; }
    export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # as diffbase sets on import; no network there
    preflight || { echo "device_run.sh: diffusers does not import; nothing would run"; return 3; }
    local left=$((LIMIT_S - SECONDS)) args rc
    args=(--out "$OUT/RESULTS-gpu.md" --budget-s "${BUDGET_S:-$((left - 30))}" --stages "$STAGES")
    [ "$TINY" = 1 ] && args+=(--tiny --device cpu)
    echo "device_run.sh: $SECONDS s of setup; gpu.py ${args[*]} $* (stopped after $((left - 10)) s)"
    timeout -k 5 $((left - 10)) "$PY" benchmarks/gpu.py "${args[@]}" "$@"
    rc=$?
    [ $rc -eq 124 ] && echo "device_run.sh: gpu.py stopped at LIMIT_S; $OUT/RESULTS-gpu.md has the stages that finished"
    for f in "$OUT"/*; do  # the tool brings back files of at most 16 MiB
        if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((15 * 1048576)) ]; then
            split -b 15M -d "$f" "$f.part" && rm "$f" && echo "device_run.sh: $f split into 15 MiB parts (cat to join)"
        fi
    done
    ls -l "$OUT"
    echo "device_run.sh: gpu.py exit $rc after $SECONDS s in all"
    return $rc
}

main "$@" 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
