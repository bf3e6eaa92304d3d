#!/usr/bin/env bash
# The GPU measurements in one go, for a CUDA host with torch and timm but not this project's venv and
# no network (e.g. a lent machine), in about 8 minutes:
#   speed  training-step speed fp32 vs AMP (independent vs full)
#   train  a short AMP `full` training on the synthetic set (the run the others measure)
#   check  env probe; TF32 / fp16 / bf16 argmax agreement with fp32; peak memory at the largest profile
#   bench  torch fp32 / fp16 / bf16 rows at 1024x2048, batch 1 and 8
#   ort    onnxruntime-gpu against eager PyTorch fp32 at 1024x2048, batch 1: every CUDA provider option set and
#          fp16 graph of benchmarks/ort_cuda.py (ort-engines: the export's engines in the bench, ort.cuda.fp32/
#          fp16, the provider check), where onnxruntime-gpu is installed or its wheel lies in $ORT_WHEELS (whole, or
#          split: *.whl.part-*), with the wheels of onnxslim and onnxconverter-common there too where the host
#          lacks them (the export needs both)
#   compiled  torch.compile and CUDA-graph rows at 1024x2048, batch 1 (the ViT's first)
#   bisect the bf16 divergence on CUDA: the same short 256x256 run with one setting changed at a time
#          (benchmarks/bf16_bisect.py: fused attention off, channels-last off, gradient clipping, ...)
#   ablation  the method's paired-seed protocol (independent, dml, full x seeds 0-2, every run at once) on
#          the synthetic set at 256x256 (configs/synthetic-256.yaml); its report and the runs' logs, metrics
#          and TensorBoard events (no weights) in OUT_DIR. $ABLATION_OVERRIDES: config overrides for every run
#   complementary  the method's pending runs on the complementary set (benchmarks/results/
#          ablation-complementary.md): the reporting seeds of section 5, then section 6's tuning round, every
#          run of each at once; reports and runs (no weights) in OUT_DIR
#   few-labels  the few-labels protocol (benchmarks/results/ablation-few-labels.md) at FEW_LABELS_N labelled
#          images (default 100): the gate (supervised and independent, tuning seeds 0-2), then, where it passes,
#          the registered tuning round (every family's candidates, seeds 0-2), every run of each at once
#
#   bash benchmarks/gpu.sh OUT_DIR [phase ...]   (python: $PYTHON or python3)
#   Default phases, in order of what they are worth: ort (the torch-free GPU engine against eager PyTorch),
#   compiled (the ViT's rows still missing), bisect, ort-engines, bench, check. Every bench and the bisection append each row to
#   OUT_DIR/<step>/rows.jsonl as soon as it is measured: a run cut off by the deadline returns what it measured.
#   GPU_SH_SECONDS=480: the deadline of the whole script; a step gets what is left of it at most.
#   GPU_SH_RUN=DIR: the run that check, bench and ort measure (default runs/gpu-full, which train rewrites);
#   GPU_SH_ITERATIONS=600: that training's length; GPU_SH_BISECT_SEEDS="0 1": the bisection's seeds.
#
# Each step has its own time limit and its log in OUT_DIR; a failed step does not stop the others.
# GPU_SH_DRY=1 prints the steps instead of running them, each as if it used its whole limit
# (tests/benchmarks/test_gpu_sh.py).
set -u
OUT_DIR=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [speed] [train] [check] [ort] [compiled] [ort-engines] [bench] [bisect] [ablation] [complementary] [few-labels]}
shift
PHASES=${*:-ort compiled bisect ort-engines bench check}
PY=${PYTHON:-python3}
RUN=${GPU_SH_RUN:-runs/gpu-full}
SIZE="1024x2048"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

DEADLINE=${GPU_SH_SECONDS:-480}  # the whole script: a lent machine's session is short

step() {  # step NAME SECONDS COMMAND...: run with a limit (within the deadline), log to OUT_DIR/NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped, out of time (GPU_SH_SECONDS=$DEADLINE)"; return 0; fi
    if [ -n "${GPU_SH_DRY:-}" ]; then echo "step $name ${limit}s: $*"; SECONDS=$((SECONDS + limit)); return 0; fi
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
    grep -v "USDT" "$OUT_DIR/$name.log" | tail -n 8
}

if [ -z "${GPU_SH_DRY:-}" ]; then
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv
        $PY -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
            torch.backends.cudnn.version(), "timm", timm.__version__, torch.cuda.get_device_name())'
        $PY -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
        lscpu | grep -E "^Model name|^CPU\(s\)"
    } >"$OUT_DIR/env.txt" 2>&1
    [ -f data/synthetic/classes.json ] || step data 60 $PY -m train.data.synthetic --out data/synthetic
fi

train() {  # a short `full` training with bf16 autocast: does it learn (val mIoU per evaluation in the log)?
    rm -rf "$RUN"
    step train-full-bf16 110 $PY -m train --config configs/synthetic.yaml --run-dir "$RUN" name=gpu-full \
        method.preset=full device=cuda amp=bf16 iterations="${GPU_SH_ITERATIONS:-600}" eval_interval=200
    [ -n "${GPU_SH_DRY:-}" ] || cp "$RUN/metrics.json" "$OUT_DIR/train-full-bf16-metrics.json"
}

have_run() { [ -n "${GPU_SH_DRY:-}" ] || [ -f "$RUN/metrics.json" ] || train; }

ort_gpu() {  # onnxruntime-gpu in place of the CPU wheel (never both: they install one module)
    $PY -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' \
        2>/dev/null && return 0
    local wheel=""
    for part in "${ORT_WHEELS:-wheels}"/onnxruntime_gpu-*.whl.part-*; do
        [ -f "$part" ] || continue
        wheel=${part%.part-*}
        cat "$wheel".part-* >"$OUT_DIR/$(basename "$wheel")" && wheel="$OUT_DIR/$(basename "$wheel")"
        break
    done
    [ -n "$wheel" ] || for w in "${ORT_WHEELS:-wheels}"/onnxruntime_gpu-*.whl; do [ -f "$w" ] && wheel=$w; done
    if [ -z "$wheel" ]; then echo "== ort: skipped, no onnxruntime-gpu here and no wheel in ${ORT_WHEELS:-wheels}/"; return 1; fi
    $PY -m pip uninstall --quiet -y onnxruntime && $PY -m pip install --quiet --no-deps "$wheel"
}

export_deps() {  # the export's own needs, from wheels beside onnxruntime-gpu's where the host lacks them
    $PY -c 'import onnxslim, onnxconverter_common' 2>/dev/null && return 0
    for w in "${ORT_WHEELS:-wheels}"/onnxslim-*.whl "${ORT_WHEELS:-wheels}"/onnxconverter_common-*.whl; do
        [ -f "$w" ] && $PY -m pip install --quiet --no-deps "$w"
    done
    $PY -c 'import onnxslim, onnxconverter_common' 2>/dev/null && return 0
    echo "== ort: skipped, the export needs onnxslim and onnxconverter-common (their wheels in ${ORT_WHEELS:-wheels}/)"
    return 1
}

bring_back() {  # bring_back RUNS DEST NAME: the report into DEST, the runs (no weights) to OUT_DIR/NAME-runs.tar.gz
    [ -n "${GPU_SH_DRY:-}" ] && return 0
    mkdir -p "$2" && cp "$1"/table.md "$1"/results.json "$1"/curves.png "$2/" 2>/dev/null
    tar czf "$OUT_DIR/$3-runs.tar.gz" --exclude='*.safetensors' --exclude=checkpoint "$1"
}

few_labels() {  # benchmarks/results/ablation-few-labels.md: the gate, then the tuning round where it passes
    local n=${FEW_LABELS_N:-100} common=(--config configs/synthetic-complementary.yaml --seeds 0 1 2 --purpose tuning
        --group cue cue_warm cue_cool --group shapes disc triangle square)
    [ -n "${GPU_SH_DRY:-}" ] || [ -f data/complementary/classes.json ] || \
        step data-complementary 60 $PY -m train.data.complementary --out data/complementary --jobs "$(nproc)"
    step few-labels-gate 240 $PY -m benchmarks.ablation "${common[@]}" --out runs/few-labels-gate --jobs 6 \
        --arms independent --arm "supervised_$n" "data.labeled=$n"
    local runs=runs/few-labels-gate
    step few-labels-gate-check 30 $PY -m benchmarks.gate --runs $runs/supervised_$n/seed{0,1,2} \
        --full-runs $runs/independent/seed{0,1,2} --cnn-classes cue_warm cue_cool --vit-classes disc triangle square \
        --out "$OUT_DIR/few-labels-gate.md"
    bring_back runs/few-labels-gate "$OUT_DIR/few-labels-gate" few-labels-gate
    if [ -z "${GPU_SH_DRY:-}" ] && ! grep -q "Gate: \*\*passed" "$OUT_DIR/few-labels-gate.md" 2>/dev/null; then
        echo "== few-labels: the gate did not pass at $n labels: no tuning (FEW_LABELS_N=200 tries the next count)"
        return 0
    fi
    local off="method.offline_run={out}/supervised/seed{seed}" balanced="method.pseudo_balance=class method.views=weak_strong"
    local arms=(  # ablation-few-labels.md, "Tuning": two candidates a family
        --arm supervised "method.preset=independent"
        --arm full_a "method.preset=full" --arm full_b "method.preset=full $balanced"
        --arm self_a "method.preset=self" --arm self_b "method.preset=self $balanced"
        --arm offline_a "method.preset=offline $off" --arm offline_b "method.preset=offline $off $balanced"
        --arm same_cnn_a "method.preset=full method.pair=cnn" --arm same_vit_a "method.preset=full method.pair=vit"
        --arm same_cnn_b "method.preset=full method.pair=cnn $balanced"
        --arm same_vit_b "method.preset=full method.pair=vit $balanced"
        --arm random_a "method.preset=full method.selection=random"
        --arm random_b "method.preset=full method.selection=random $balanced")
    step few-labels-tuning 480 $PY -m benchmarks.ablation "${common[@]}" --out runs/few-labels --jobs 39 \
        "data.labeled=$n" "${arms[@]}" --baselines supervised
    bring_back runs/few-labels "$OUT_DIR/few-labels" few-labels
}

complementary() {  # benchmarks/results/ablation-complementary.md: section 5's reporting runs, then section 6's round
    local common=(--config configs/synthetic-complementary.yaml --group cue cue_warm cue_cool
        --group shapes disc triangle square)
    [ -n "${GPU_SH_DRY:-}" ] || [ -f data/complementary/classes.json ] || \
        step data-complementary 60 $PY -m train.data.complementary --out data/complementary --jobs "$(nproc)"
    step complementary-reporting 300 $PY -m benchmarks.ablation "${common[@]}" --out runs/complementary-reporting \
        --seeds 10 11 12 13 14 --jobs 20 --purpose reporting --arms independent --arm full_a "method.preset=full" \
        --arm dml_b "method.preset=dml method.dml_weight=0.3" --arm random_a "method.preset=full method.selection=random" \
        --baselines independent dml_b random_a
    local arms=(  # section 6: three candidates for each family
        --arm full_d "method.preset=full method.learners=vit"
        --arm full_e "method.preset=full method.learners=vit method.region_size=4 method.region_weight=5 method.start=0.1"
        --arm full_f "method.preset=full method.learners=cnn"
        --arm dml_d "method.preset=dml method.dml_weight=0.3 method.learners=vit"
        --arm dml_e "method.preset=dml method.dml_weight=3 method.start=0.1 method.learners=vit"
        --arm dml_f "method.preset=dml method.dml_weight=0.3 method.learners=cnn"
        --arm random_d "method.preset=full method.learners=vit method.selection=random"
        --arm random_e "method.preset=full method.learners=vit method.region_size=4 method.region_weight=5 method.start=0.1 method.selection=random"
        --arm random_f "method.preset=full method.learners=cnn method.selection=random")
    step complementary-round2 240 $PY -m benchmarks.ablation "${common[@]}" --out runs/complementary \
        --seeds 0 1 --jobs 20 --purpose tuning --arms independent "${arms[@]}" --baselines independent
    bring_back runs/complementary-reporting "$OUT_DIR/complementary-reporting" complementary-reporting
    bring_back runs/complementary "$OUT_DIR/complementary" complementary
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
    check)
        have_run
        step gpu-check 60 $PY -m benchmarks.gpu_check --run "$RUN" --out "$OUT_DIR" --size 1024 2048 --images 4
        ;;
    compiled)  # the compiled PyTorch rows at a Cityscapes-sized input (the ViT's are still to do)
        have_run
        step bench-compiled 120 $PY -m benchmarks.bench --run "$RUN" --models vit cnn \
            --backends torch torch.compile torch.cudagraphs --batch-sizes 1 --sizes $SIZE --seconds 1 \
            --eval-images 2 --out "$OUT_DIR/bench-compiled"
        ;;
    bench)  # the eager PyTorch rows on the GPU at a Cityscapes-sized input
        have_run
        step bench-eager 80 $PY -m benchmarks.bench --run "$RUN" --models cnn vit ensemble \
            --backends torch torch.bf16 torch.fp16 --batch-sizes 1 8 --sizes $SIZE --seconds 1 \
            --eval-images 10 --out "$OUT_DIR/bench-eager"
        ;;
    ort)  # every option set and fp16 graph of ONNX Runtime's CUDA provider against eager PyTorch
        have_run
        if [ -n "${GPU_SH_DRY:-}" ] || { ort_gpu && export_deps; }; then
            step ort-options 200 $PY -m benchmarks.ort_cuda --run "$RUN" --size ${SIZE/x/ } --out "$OUT_DIR/ort-cuda"
        fi
        ;;
    ort-engines)  # the export's engines at 1024x2048 on the CUDA provider (the bench asserts it is active)
        have_run
        if [ -n "${GPU_SH_DRY:-}" ] || { ort_gpu && export_deps; }; then
            step export-1024x2048 60 $PY -m export --run "$RUN" --variants fp32 fp16 --size 1024 2048 \
                --max-batch 8 --parity-images 2 --batch-sizes 1
            step bench-ort-cuda 50 $PY -m benchmarks.bench --run "$RUN" \
                --models cnn vit --backends torch ort.cuda.fp32 ort.cuda.fp16 --batch-sizes 1 8 --sizes $SIZE \
                --seconds 1 --eval-images 4 --out "$OUT_DIR/bench-ort-cuda"
        fi
        ;;
    bisect)  # which one setting removes the bf16 divergence (every variant and seed at once on the GPU)
        [ -n "${GPU_SH_DRY:-}" ] || [ -f data/synthetic-256/classes.json ] || \
            step data-256 60 $PY -m train.data.synthetic --out data/synthetic-256 --height 256 --width 256 --jobs "$(nproc)"
        step bf16-bisect 240 $PY -m benchmarks.bf16_bisect --out "$OUT_DIR/bf16-bisect" --seeds ${GPU_SH_BISECT_SEEDS:-0 1} --iterations 500
        ;;
    ablation)  # not in the default phases: it needs the whole session (issue 15's GPU part)
        step data-256 60 $PY -m train.data.synthetic --out data/synthetic-256 --height 256 --width 256 --jobs "$(nproc)"
        step ablation-256 480 $PY -m benchmarks.ablation --config configs/synthetic-256.yaml --out runs/ablation-256 \
            --jobs 9 --arms independent dml full --seeds 0 1 2 -- ${ABLATION_OVERRIDES:-}
        bring_back runs/ablation-256 "$OUT_DIR" ablation-256
        ;;
    complementary)  # not in the default phases: the method's pending runs on its own set, every run at once
        complementary
        ;;
    few-labels)  # not in the default phases: the few-labels gate and tuning, every run of each at once
        few_labels
        ;;
    *) echo "unknown phase '$phase' (speed, train, check, ort, compiled, ort-engines, bench, bisect, ablation, complementary, few-labels)" >&2; exit 2 ;;
    esac
done
