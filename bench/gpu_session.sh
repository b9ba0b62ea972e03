#!/usr/bin/env bash
# The GPU runs of the model-quality issue on a lent GPU machine, prepared here so that a
# session with one spends its 15 minutes of device time on them and not on setting up.
#
# Before, on this machine (needs ../shared; trains the judge first if its cache has none):
#     .venv/bin/python bench/device_pack.py            # -> .device-pack/, about 56 MiB
# Then two device calls, one right after the other (the machine stays warm 30 s; a study
# call that ran out of time, made again at once, keeps the shards and finished runs):
#     run(command="bash bench/gpu_session.sh study", carry=[".device-pack"], timeout_s=590)
#     run(command="bash bench/gpu_session.sh speed", carry=[".device-pack"], timeout_s=300)
# Each writes its JSON, its log, and the study's sample grids in one tarball or the speed
# bench's profiler tables, to $OUT. Arguments after `study` go to bench/quality.py
# (`--images-seen 150000` for a shorter study).
#
# The machine's image has torch, pyarrow, pillow and the rest; carmodels runs from the
# checkout, and the pure-Python packages it lacks come from the pack. Nothing is installed.
# Smoke test on a CPU (tiny budget, no CUDA): GPU_SESSION_SMOKE=1 bash bench/gpu_session.sh study
set -euo pipefail
cd "$(dirname "$0")/.."
pack=${DEVICE_PACK:-.device-pack}
if [[ ! -f $pack/judge/judge.json ]]; then
    echo "gpu_session: no $pack here; make it first: python bench/device_pack.py" >&2
    exit 2
fi
export PYTHONPATH="$PWD:$(realpath "$pack")/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
out=${OUT:-/tmp/gpu-session-out}
work=${GPU_SESSION_WORK:-/tmp/gpu-session-work}  # kept between calls while the machine is warm
mkdir -p "$out" "$work"
stamp=$(date -u +%Y-%m-%d)
# h100 or h200, as the results' file names in docs/bench-results say it.
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -o 'H[0-9]\{3\}' |
    head -1 | tr H h || true)

case ${1:-} in
study)
    budget=(--budget gpu128)
    name=$stamp-quality-gpu128-${card:-gpu}
    if [[ -n ${GPU_SESSION_SMOKE:-} ]]; then
        budget=(--budget cpu64 --images-seen 64 --recipes seed,ema,combined)
        name=$stamp-quality-smoke
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$python" bench/quality.py "${budget[@]}" --images "$pack/photos" --judge-pack "$pack/judge" \
        --work "$work/quality" --json "$out/grids/$name.json" "${@:2}" 2>&1 | tee "$out/quality.log"
    # The device tool brings back at most 8 files of at most 16 MiB: the grids travel as JPEGs
    # in one tarball (the 16 PNG grids at 128 px could pass 16 MiB together).
    mv "$out/grids/$name.json" "$out/"
    "$python" - "$out/grids" <<'PY'
import sys
from pathlib import Path

from PIL import Image

for png in Path(sys.argv[1]).glob("*.png"):
    with Image.open(png) as grid:
        grid.convert("RGB").save(png.with_suffix(".jpg"), quality=90)
    png.unlink()
PY
    tar -czf "$out/quality-grids.tar.gz" -C "$out/grids" .
    rm -r "$out/grids"
    ;;
speed)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$python" bench/train_gpu.py --variants fp32,bf16+cl,bf16+cl+compile --steps 200 \
        --json "$out/$stamp-${card:-gpu}-train-step.json" --profile "$out/train_gpu-profile.txt" \
        2>&1 | tee "$out/train_gpu.log"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh study [quality.py options] | speed" >&2
    exit 2
    ;;
esac
