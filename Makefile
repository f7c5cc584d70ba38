# pidserve — the two commands a fresh machine needs: `make serve` and `make test`.
# Everything else is set up on demand: a virtual environment with a pinned CPU build of
# torch installed first (a bare `torch` requirement could pull a multi-GB CUDA build).

PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# torch comes from PyTorch's CPU index first (PyPI's torch is the multi-GB CUDA build on a stock machine),
# from the default index when that one cannot be reached or lacks the version.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Extra pip arguments for torch only
TORCH_PIP_ARGS ?=
# Extra `pidserve serve` flags, e.g. SERVE_ARGS="--port 9000 --host 0.0.0.0" (or PIDSERVE_* variables)
SERVE_ARGS ?=
BIN := $(VENV)/bin
# Two installs: what serving needs (`make serve`), and on top of it the test tool chain (`make test`).
SERVE_STAMP := $(VENV)/.pidserve-serve-installed
STAMP := $(VENV)/.pidserve-installed

.PHONY: install test lint imports serve clean default-model gpu-wheels

install: $(STAMP)

$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --timeout 20 --retries 1 --index-url $(TORCH_INDEX) $(TORCH_PIP_ARGS) \
		"$(TORCH_SPEC)" || $(BIN)/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e .
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	$(BIN)/python -m pip install -e ".[test]"
	$(BIN)/python -m pip install --no-deps "tensorrt-stubs>=10.0"
	touch $(STAMP)

test: $(STAMP) imports
	$(BIN)/ruff check .
	$(BIN)/pytest -q  # not python -m pytest: that puts the repo root first on sys.path

# import-linter's contracts (pyproject.toml [tool.importlinter]). grimp finds subpackages only
# below their parent's folder, so it checks a copy laid out as the installed package is.
IMPORTS_TREE := $(shell mktemp -d -u)/tree
imports: $(STAMP)
	mkdir -p $(IMPORTS_TREE)/pidserve
	cp -r pidserve/. $(IMPORTS_TREE)/pidserve/
	for d in model engines kernels bench training server; do cp -r $$d $(IMPORTS_TREE)/pidserve/$$d; done
	cp pyproject.toml $(IMPORTS_TREE)/
	cd $(IMPORTS_TREE) && PYTHONPATH=$(IMPORTS_TREE) $(abspath $(BIN))/lint-imports --no-cache
	rm -rf $(dir $(IMPORTS_TREE))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

serve: $(SERVE_STAMP)
	$(BIN)/pidserve serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Rebuild the embedded default from scratch (network for the photo packages; ~4 h on 2 CPU cores).
# Exactly the commands recorded in model/weights/MODEL_CARD.md. tiny-ae's latent statistics go
# into its file; after copying a new tiny-ae, set TINY_AE_SHIFT / TINY_AE_STD in
# model/latents/builtin.py to them (tests/model/test_default.py checks that they agree).
default-model: $(STAMP)
	$(BIN)/pidserve data photos --out data/photos
	$(BIN)/pidserve train autoencoder -c recipes/tiny_ae.toml
	cp runs/tiny-ae/tiny-ae.safetensors model/weights/tiny-ae.safetensors
	$(BIN)/pidserve train teacher -c recipes/pid_tiny_regression.toml
	$(BIN)/pidserve train teacher -c recipes/pid_tiny_teacher.toml
	$(BIN)/pidserve bench x0-error runs/pid-tiny-regression/teacher_ema.safetensors \
		runs/pid-tiny-teacher/teacher_ema.safetensors --autoencoder model/weights/tiny-ae.safetensors
	$(BIN)/pidserve train distill -c recipes/pid_tiny_distill.toml
	$(BIN)/pidserve train distill -c recipes/pid_tiny_finetune.toml
	cp runs/pid-tiny-finetune/student.safetensors model/weights/pid-tiny.safetensors

# Wheels for an offline GPU machine whose image has torch, triton, numpy, safetensors, pillow, tqdm,
# httpx, prometheus-client and nvidia-ml-py but not the rest of pidserve's dependencies (the lent
# H100/H200 machines: Python 3.12, x86-64). Same versions as this venv; bench/gpu_suite.sh installs them.
GPU_WHEEL_PACKAGES := opentelemetry-api pydantic pydantic-core pydantic-settings python-dotenv annotated-types \
	typing-inspection annotated-doc fastapi starlette uvicorn typer fpng simplejpeg
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip freeze | grep -iE '^($(subst -,[-_],$(subst $() ,|,$(GPU_WHEEL_PACKAGES))))==' > .whl/requirements.txt
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl -r .whl/requirements.txt
	@ls .whl
