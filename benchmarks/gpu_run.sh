#!/usr/bin/env bash
# GPU timings on a lent single-GPU machine (see docs/scaling.md, "Measured on a GPU").
#
# Run from the repository root on a machine whose python3 already has torch (CUDA), timm,
# scikit-image, scipy, tifffile; the other dependencies travel as wheels in .whl/ and the mouse
# data in .devdata/mouse-cerebellum/. Every result lands in $OUT (default ./gpu-out); each step has
# its own time limit so one slow step cannot take the others down.
#
#     bash benchmarks/gpu_run.sh            # every step
#     bash benchmarks/gpu_run.sh 3 5        # only steps 3 and 5
set -u
STEPS=${*:-"1 2 3 4 5 6"}
want() { [[ " $STEPS " == *" $1 "* ]]; }
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export SMSDL_SHARED_DATA=$PWD/.devdata/mouse-cerebellum
step() { echo "=== $1 ($(date +%T))"; }

step "machine"
{ nvidia-smi -L; nproc; python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | tee "$OUT/machine.txt"

if want 1; then
step "1. reconstruction benchmark, default preset, GPU"
timeout 240 python3 benchmarks/bench_reconstruction.py --preset default --no-ablation --name reconstruction_gpu \
    > "$OUT/reconstruction_gpu.log" 2>&1
echo "rc $?"; cp benchmarks/results/reconstruction_gpu.json "$OUT/" 2>/dev/null; grep -v Warning "$OUT/reconstruction_gpu.log" | tail -20

fi

if want 2; then
step "2. torchrun: 1 process (NCCL) vs plain, smsdl benchmark --fast on the sample"
python3 - <<'EOF'
import numpy as np
from skimage import io
from napari_smsdl.sample import make_sample
s = make_sample()
io.imsave("/tmp/he.png", s.he_rgb, check_contrast=False)
np.save("/tmp/truth.npy", np.where(s.mask_hr, s.ground_truth, 0).astype(np.float32))
EOF
timeout 90 python3 -m napari_smsdl benchmark --he /tmp/he.png --msi /tmp/truth.npy --factor 4 --fast -o /tmp/plain > "$OUT/plain.log" 2>&1
echo "plain rc $?"
timeout 90 python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m napari_smsdl benchmark \
    --he /tmp/he.png --msi /tmp/truth.npy --factor 4 --fast -o /tmp/torchrun1 > "$OUT/torchrun1.log" 2>&1
echo "torchrun rc $?"
python3 - <<'EOF' 2>&1 | tee "$OUT/torchrun_compare.txt"
import json, os
for name in ("plain", "torchrun1"):
    p = f"/tmp/{name}/metrics.json"
    if os.path.exists(p):
        m = json.load(open(p))
        print(name, {k: (round(v["rmse"]["mean"], 4), round(v["ssim"]["mean"], 4), round(v["seconds"], 1))
                     for k, v in m.items() if isinstance(v, dict) and "rmse" in v})
EOF
grep -i "nccl\|backend" "$OUT/torchrun1.log" | head -3

fi

if want 3; then
step "3. whole-slide features, 20k x 20k, GPU"
timeout 200 python3 benchmarks/bench_wsi.py --size 20000 --device cuda --work /tmp/wsi --no-save --slide-compression zlib > "$OUT/wsi_gpu.log" 2>&1
echo "rc $?"; tail -40 "$OUT/wsi_gpu.log"

fi

if want 4; then
step "4. 1024 channels, GPU"
timeout 120 python3 benchmarks/bench_wsi.py --channels 1024 --device cuda --work /tmp/wsi --no-save > "$OUT/channels_gpu.log" 2>&1
echo "rc $?"; tail -20 "$OUT/channels_gpu.log"
fi

if want 5; then
step "5. CPU scaling on this machine: smsdl benchmark --fast --device cpu, 1 process vs torchrun 2 ranks (gloo)"
[ -f /tmp/he.png ] || python3 -c "
import numpy as np; from skimage import io; from napari_smsdl.sample import make_sample
s = make_sample(); io.imsave('/tmp/he.png', s.he_rgb, check_contrast=False)
np.save('/tmp/truth.npy', np.where(s.mask_hr, s.ground_truth, 0).astype(np.float32))"
timeout 120 python3 -m napari_smsdl benchmark --he /tmp/he.png --msi /tmp/truth.npy --factor 4 --fast --device cpu \
    -o /tmp/cpu1 > "$OUT/cpu1.log" 2>&1; echo "1 process rc $?"
timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m napari_smsdl benchmark \
    --he /tmp/he.png --msi /tmp/truth.npy --factor 4 --fast --device cpu -o /tmp/cpu2 > "$OUT/cpu2.log" 2>&1
echo "2 ranks rc $?"
grep -h "smsdl:\|cnn:\|bicubic:" "$OUT/cpu1.log" "$OUT/cpu2.log"
fi
if want 6; then
step "6. smsdl reconstruct, 1024 channels (chunked path), GPU: plain and torchrun 1 rank"
python3 benchmarks/make_many_channel_input.py --channels 1024 -o /tmp/mc > /dev/null
for run in plain torchrun1; do
    launcher="python3 -m napari_smsdl"
    [ $run = torchrun1 ] && launcher="python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m napari_smsdl"
    timeout 150 $launcher reconstruct --he /tmp/mc/he.png --msi /tmp/mc/msi.npy --factor 4 --fast \
        --msi-pixel-size 40 --he-pixel-size 2.5 --baselines bicubic -o /tmp/mc/$run > "$OUT/many_$run.log" 2>&1
    echo "$run rc $?"; cp /tmp/mc/$run/run.json "$OUT/many_channels_$run.json" 2>/dev/null
done
python3 -c "
import json
for run in ('plain', 'torchrun1'):
    try:
        d = json.load(open('$OUT/many_channels_' + run + '.json'))
        print(run, {k: round(v, 1) for k, v in d['seconds'].items()}, 'peak MB', round(d['peak_memory_mb']))
    except Exception as exc:
        print(run, 'no run.json', exc)"
fi
step "done"
