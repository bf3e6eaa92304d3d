#!/usr/bin/env bash
# The GPU measurements in one go, for a CUDA host that has torch and timm but not this project's
# venv (e.g. a lent machine): training-step speed fp32 vs AMP (independent vs full), a short AMP
# `full` training on the synthetic set, and the PyTorch rows of the engine bench.
#
#   bash benchmarks/gpu.sh OUT_DIR [speed] [train] [bench]    (default: all three; python: $PYTHON or python3)
#
# Each step has its own time limit and its log in OUT_DIR; a failed step does not stop the others.
# `bench` trains first when the run is missing.
set -u
OUT_DIR=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [speed] [train] [bench]}
shift
PHASES=${*:-speed train bench}
PY=${PYTHON:-python3}
RUN=runs/gpu-full
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log, report the outcome
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
    grep -v "USDT" "$OUT_DIR/$name.log" | tail -n 8
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
        torch.backends.cudnn.version(), "timm", timm.__version__, torch.cuda.get_device_name())'
    lscpu | grep -E "^Model name|^CPU\(s\)"
} >"$OUT_DIR/env.txt" 2>&1

[ -f data/synthetic/classes.json ] || step data 300 $PY -m train.data.synthetic --out data/synthetic

train() {  # a short `full` training with bf16 autocast: does it learn (val mIoU per evaluation in the log)?
    rm -rf "$RUN"
    step train-full-bf16 240 $PY -m train --config configs/synthetic.yaml --run-dir "$RUN" name=gpu-full \
        method.preset=full device=cuda amp=bf16
    cp "$RUN/metrics.json" "$OUT_DIR/train-full-bf16-metrics.json"
    grep -h "val mIoU" "$OUT_DIR/train-full-bf16.log"
}

for phase in $PHASES; do
    case $phase in
    speed)  # step time at a Cityscapes-like crop (OS8 as in configs/cityscapes.yaml), then at the demo's
        for amp in none bf16 fp16; do
            step "train-speed-512x1024-$amp" 150 $PY -m benchmarks.train_speed --crop 512 1024 --batch 8 \
                --amp "$amp" --warmup 5 --steps 24 --rounds 3 --json "$OUT_DIR/train-speed-512x1024-$amp.json" \
                cnn.output_stride=8
        done
        step train-speed-64x64-bf16 90 $PY -m benchmarks.train_speed --amp bf16 --warmup 5 --steps 24 --rounds 3 \
            --json "$OUT_DIR/train-speed-64x64-bf16.json"
        ;;
    train) train ;;
    bench)  # the PyTorch rows on the GPU (ONNX Runtime's CUDA/TensorRT rows need onnxruntime-gpu)
        [ -f "$RUN/metrics.json" ] || train
        step bench-eager 150 $PY -m benchmarks.bench --run "$RUN" --models cnn vit ensemble \
            --backends torch torch.bf16 torch.fp16 --batch-sizes 1 8 --sizes 512x1024 --seconds 1 \
            --eval-images 100 --out "$OUT_DIR/bench-eager"
        step bench-compiled 240 $PY -m benchmarks.bench --run "$RUN" --models cnn vit \
            --backends torch torch.compile torch.cudagraphs --batch-sizes 1 8 --sizes 512x1024 --seconds 1 \
            --eval-images 20 --out "$OUT_DIR/bench-compiled"
        ;;
    *) echo "unknown phase '$phase' (speed, train, bench)" >&2; exit 2 ;;
    esac
done
