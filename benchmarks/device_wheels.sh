#!/usr/bin/env bash
# The wheels benchmarks/gpu.py needs on the GPU machine and that its image lacks (it has torch 2.11 cu130,
# transformers 5.17, peft, accelerate, torchmetrics, safetensors, torchvision, pillow, numpy, matplotlib,
# scipy; no diffusers, torchao, bitsandbytes; no internet), downloaded here into .whl/ (git-ignored), which
# the device run carries (`carry: [".whl"]`) and benchmarks/device_run.sh installs. Run it from anywhere:
#   bash benchmarks/device_wheels.sh
#
# .whl/*.whl, always installed there (--no-deps: each dependency is named here or is in the image):
#   diffusers 0.42.1  pyproject's pin; its dependencies are in the image or in .whl/if-missing
#   torchao 0.18.0    int8 (lowmem) and fp8dq (fp8); it requires torch >= 2.11 (pytorch/ao#4401, "drop
#                     PyTorch <2.11 support"; torchao/__init__.py loads its kernels for torch >= 2.11.0) and
#                     its PyPI kernels link libcudart.so.13, the image's CUDA; the version tested here
#   bitsandbytes 0.50.2, CUDA 13 only: nf4 (lowmem). The PyPI wheel is 41 MiB (libraries for CUDA 11.8 to
#                     13.2, ROCm, XPU), too much beside the 64 MiB a device run carries, so it is re-zipped
#                     with the CPU and CUDA 13.x libraries only (~7 MiB; RECORD rewritten to match).
#                     NO_BNB=1 leaves it out: gpu.py then trains that row on fp8 (its own fallback).
# .whl/if-missing/*.whl, installed by device_run.sh only where the image lacks the module or has it older
# than diffbase needs: huggingface_hub (diffusers wants >= 1.32, transformers 5.17 < 2), requests and its
# dependencies (diffusers' pipelines import it), tensorboard with absl-py and protobuf >= 6.31.1 (training's
# default logging.report_to; writing events needs no grpcio, werkzeug or tensorboard-data-server).
set -euo pipefail
cd "$(dirname "$0")/.."

WHL_LIMIT_MIB=${WHL_LIMIT_MIB:-36}  # 64 MiB carried in all, less the ~22 MiB work tree and room for it to grow
TREE_LIMIT_MIB=60                    # tree + .whl, with 4 MiB to spare under the 64 MiB a run carries
PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
ALWAYS=(diffusers==0.42.1 torchao==0.18.0)
IF_MISSING=(huggingface_hub==1.33.0 requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1
            charset_normalizer==3.5.2 tensorboard==2.21.0 absl-py==2.5.1 protobuf==7.36.2)
BNB=bitsandbytes==0.50.2

rm -rf .whl
mkdir -p .whl/if-missing
"${PIP[@]}" -d .whl "${ALWAYS[@]}"
"${PIP[@]}" -d .whl/if-missing "${IF_MISSING[@]}"
if [ "${NO_BNB:-0}" != 1 ]; then
    "${PIP[@]}" -d .whl/bnb-full "$BNB"
    python3 - .whl/bnb-full/bitsandbytes-*.whl .whl <<'EOF'
import re, sys, zipfile
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")  # the image's torch is cu130
dropped = set()
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.endswith(".so") and not keep.search(info.filename):
            dropped.add(info.filename)
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(x for x in lines if x.split(",")[0] not in dropped).encode()
        zout.writestr(info, data)
print(f"bitsandbytes: left out {len(dropped)} libraries ({', '.join(sorted(Path(d).stem for d in dropped))})")
EOF
    rm -rf .whl/bnb-full
fi

# every dependency of what is downloaded: in the image, named above, or optional
for w in .whl/*.whl .whl/if-missing/*.whl; do
    deps=$(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | cut -d' ' -f2- | tr '\n' ' ' || true)
    echo "$(basename "$w"): ${deps:-no dependencies}"
done

du -b .whl/*.whl .whl/if-missing/*.whl | awk '{printf "%7.2f MiB  %s\n", $1 / 1048576, $2}'
whl=$(du -sb .whl | cut -f1)
tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
awk -v w="$whl" -v t="$tree" -v lw="$WHL_LIMIT_MIB" -v lt="$TREE_LIMIT_MIB" 'BEGIN {m = 1048576
    printf ".whl: %.1f MiB (limit %d); work tree that travels: %.1f MiB; together %.1f MiB (limit %d)\n",
           w / m, lw, t / m, (w + t) / m, lt}'
if [ "$whl" -gt $((WHL_LIMIT_MIB * 1048576)) ] || [ $((whl + tree)) -gt $((TREE_LIMIT_MIB * 1048576)) ]; then
    echo "device_wheels.sh: over the limit; the device run would not carry it" >&2
    exit 1
fi
