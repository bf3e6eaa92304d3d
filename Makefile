# The verbs users type. Every target installs what it needs first (make setup), so a fresh
# clone needs no manual step.
PYTHON ?= python3
VENV := .venv
TRITON_VENV := $(VENV)/triton
PY := $(VENV)/bin/python
CONFIG ?= configs/synthetic.yaml
RUN ?= runs/demo
ARGS ?=

.PHONY: setup setup-gpu data check-data train eval export export-trt triton-repo predict serve serve-triton demo ablation bench bench-train load soak test lint format docs clean

# uv installs (parallel downloads and unpacking: ~45 s where pip takes ~3 min for the venv's 7 GB); pip stays in
# the venv for setup-gpu and for users' own installs.
UV := $(VENV)/bin/uv pip install --quiet -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt uv
	$(UV) --python $(PY) -e '.[train,export,serve,video,openvino,bench,cpu,dev]'
	touch $@

setup: $(VENV)/.installed

# A CUDA host: onnxruntime-gpu and pycuda in place of the CPU wheel (both install one module).
# pycuda (a source build) comes first, so a host without the CUDA toolkit keeps its working ONNX
# Runtime; the CPU wheel comes back if onnxruntime-gpu cannot be installed.
setup-gpu: setup
	$(PY) -m pip install --quiet --no-compile -c constraints.txt 'pycuda>=2025.1.2' || { echo "error: pycuda did \
	not build: it needs the CUDA toolkit (nvcc and headers; CUDA_ROOT=/usr/local/cuda or where it lies). \
	Nothing was changed: onnxruntime (CPU) is still installed." >&2; exit 1; }
	$(PY) -m pip uninstall --quiet -y onnxruntime
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[train,export,serve,video,openvino,bench,gpu,dev]' || { \
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[cpu]'; echo "error: onnxruntime-gpu \
	could not be installed; the CPU onnxruntime is back" >&2; exit 1; }

# Both embedded sets: the demo's, and the one the method is measured on (classes that one student reads
# and the other does not: docs/method.md)
data: setup
	$(PY) -m train.data.synthetic --out data/synthetic
	$(PY) -m train.data.complementary --out data/complementary --jobs 2

# Every image and mask of the config's splits read once: counts, class shares, problems by file.
# make check-data CONFIG=configs/cityscapes.yaml ARGS="data.root=/data/cityscapes"
check-data: setup $(if $(findstring synthetic,$(CONFIG)),data)
	$(PY) -m train.data.check --config $(CONFIG) $(ARGS)

# make train CONFIG=configs/cityscapes.yaml ARGS="iterations=1000 data.root=/data/cityscapes"
train: setup $(if $(findstring synthetic,$(CONFIG)),data)
	$(PY) -m train --config $(CONFIG) $(ARGS)

eval: setup
	$(PY) -m train.evaluate --run $(RUN)

# make export RUN=runs/demo ARGS="--variants fp32 fp16"
export: setup
	$(PY) -m export --run $(RUN) $(ARGS)

# TensorRT plans from the ONNX engines (needs an NVIDIA GPU and the `trt` extra, or trtexec on PATH).
# Exports first only where no engine dir is there yet; plans are rebuilt only when their ONNX changed.
# ARGS go to python -m export.tensorrt: make export-trt RUN=runs/demo ARGS="--variants fp16 --no-check"
export-trt: setup
	@test -f $(RUN)/export/cnn/manifest.json -a -f $(RUN)/export/vit/manifest.json || $(PY) -m export --run $(RUN)
	$(PY) -m export.tensorrt --run $(RUN) $(ARGS)

# A Triton Inference Server model repository from the engine dirs: runs/<name>/triton
triton-repo: setup
	$(PY) -m export.triton --run $(RUN) $(ARGS)

# Class maps of images, folders, globs and videos on disk: make predict RUN=runs/demo ARGS="--out masks photos/"
predict: setup
	$(PY) -m serve.predict --engines $(RUN)/export $(ARGS)

# The Gradio demo on a run's engines: make serve RUN=runs/demo ARGS="--host 0.0.0.0 --port 7860"
serve: setup
	$(PY) -m serve --engines $(RUN)/export $(ARGS)

# A real Triton Inference Server (PyTriton's) on a run's engines: HTTP :8000, gRPC :8001, metrics :8002.
# PyTriton pins numpy < 2: it gets its own torch-free environment, .venv/triton (inside .venv: ignored like it).
$(TRITON_VENV)/.installed: pyproject.toml $(VENV)/.installed
	$(PYTHON) -m venv $(TRITON_VENV)
	$(UV) --python $(TRITON_VENV)/bin/python -e '.[cpu,openvino,triton]'
	touch $@

serve-triton: $(TRITON_VENV)/.installed
	$(TRITON_VENV)/bin/python -m serve.triton_server --engines $(RUN)/export $(ARGS)

# The whole pipeline on the embedded dataset: data, training (a second `make demo` resumes or just
# re-reports runs/demo), the engines a CPU user serves (ONNX Runtime and OpenVINO: fp32, bf16 where the CPU
# has it, int8 where it passes the gate and pays) through the parity gate at every size, a short bench, a
# picture of what the engines see (runs/demo/overlays.png); then where the time went, per phase. The GPU's
# precisions too (fp16, TensorRT's int8): make export RUN=runs/demo
DEMO_TRAIN = if [ -f runs/demo/checkpoint/last.safetensors ]; then $(PY) -m train --resume runs/demo $(ARGS); \
	else $(PY) -m train --config configs/synthetic.yaml --run-dir runs/demo name=demo $(ARGS); fi
demo:
	@$(PYTHON) -m benchmarks.phases "install=$(MAKE) --no-print-directory setup" \
		"data=$(PY) -m train.data.synthetic --out data/synthetic" \
		"train=$(DEMO_TRAIN)" \
		"export=$(PY) -m export --run runs/demo --variants fp32 int8.cpu" \
		"bench=$(PY) -m benchmarks.bench --run runs/demo --models cnn vit ensemble --backends torch ort.cpu.fp32 \
		ort.cpu.int8 ov.fp32 ov.bf16 ov.int8 --batch-sizes 1 --sizes 64x64 --seconds 1 --eval-images 100" \
		"overlays=$(PY) -m benchmarks.overlays --run runs/demo"
	@echo; echo "Start the demo app: make serve RUN=runs/demo   (then open http://127.0.0.1:7860)"

# Every engine of a run against its PyTorch students: runs/<name>/bench/{results.json,report.md,*.png}
bench: setup
	$(PY) -m benchmarks.bench --run $(RUN) $(ARGS)

# N concurrent users against a running `make serve`: make load ARGS="--clients 16 --seconds 60"
load: setup
	$(PY) -m benchmarks.load $(ARGS)

# An hour under load and faults (the app, Triton, killed predict and export runs, locks):
# benchmarks/results/soak-cpu.md. make soak RUN=runs/demo ARGS="--minutes 60"
soak: setup $(TRITON_VENV)/.installed
	$(PY) -m benchmarks.soak --run $(RUN) $(ARGS)

# independent / dml / full over 3 paired seeds, test-split numbers: runs/ablation/table.md
# make ablation ARGS="--jobs 2 iterations=6000" is the protocol of benchmarks/results/ablation-synthetic.md
ablation: data
	$(PY) -m benchmarks.ablation --config $(CONFIG) $(ARGS)

# Images/s of a training step, independent vs full: make bench-train ARGS="--crop 512 1024 --batch 8"
bench-train: data
	$(PY) -m benchmarks.train_speed --config $(CONFIG) $(ARGS)

# The browser test drives Debian's chromium; as root, install it when missing (else that test skips).
test: setup $(TRITON_VENV)/.installed
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium could not be installed: the browser test will skip"
	PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

# The documentation site from docs/ (MkDocs, Material theme) into site/; the reference page is generated from
# the code first (the config dataclasses, every command's parser).
docs: setup
	$(PY) docs/reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	@echo "site/index.html (or: $(VENV)/bin/mkdocs serve)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs data/synthetic site
