# The verbs users type. Every target installs what it needs first (make setup), so a fresh
# clone needs no manual step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/synthetic.yaml
RUN ?= runs/demo
ARGS ?=

.PHONY: setup data train eval export export-trt demo ablation bench-train test lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,export,cpu,dev]'
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) -m train.data.synthetic --out data/synthetic

# make train CONFIG=configs/cityscapes.yaml ARGS="iterations=1000 data.root=/data/cityscapes"
train: setup $(if $(findstring synthetic,$(CONFIG)),data)
	$(PY) -m train --config $(CONFIG) $(ARGS)

eval: setup
	$(PY) -m train.evaluate --run $(RUN)

# make export RUN=runs/demo ARGS="--variants fp32 fp16"
export: setup
	$(PY) -m export --run $(RUN) $(ARGS)

# TensorRT plans from the ONNX engines (needs an NVIDIA GPU and the `trt` extra, or trtexec on PATH)
export-trt: export
	$(PY) -m export.tensorrt --run $(RUN)

# The whole pipeline on the embedded dataset: data, training (a second `make demo` resumes or just
# re-reports runs/demo), then ONNX engines of both students through the parity gate.
demo: data
	@if [ -f runs/demo/checkpoint/last.safetensors ]; then \
		$(PY) -m train --resume runs/demo $(ARGS); \
	else \
		$(PY) -m train --config configs/synthetic.yaml --run-dir runs/demo name=demo $(ARGS); \
	fi
	$(PY) -m export --run runs/demo

# Every method preset on the synthetic set, same seed and budget: runs/ablation/table.md
ablation: data
	$(PY) -m benchmarks.ablation --config $(CONFIG) $(ARGS)

# Images/s of a training step, independent vs full: make bench-train ARGS="--crop 512 1024 --batch 8"
bench-train: data
	$(PY) -m benchmarks.train_speed --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs data/synthetic
