# clipforge — common tasks.  Every target creates .venv if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; override for CUDA, e.g. `make test TORCH_SPEC=torch==2.13.0+cu128`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install lint test test-slow bench-loss bench-eval bench-index bench-serve bench-generate bench-demo-curve figures fonts figure-search browser demo clean gpu-wheels gpu-check bench-siglip

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,bench,docs,train,search]"
	touch $(STAMP)

install: $(STAMP)

# ruff, configured in pyproject.toml: pyflakes, pycodestyle, import order, bugbear, pyupgrade.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs

test: lint
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tests, the browser test of the search page among them: CLIPFORGE_REQUIRE_BROWSER makes
# that test fail, not skip, when chromium is missing.
test-slow: $(STAMP) browser
	CLIPFORGE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -m slow

# Debian's chromium and chromedriver for the browser test: installed with apt-get when missing and
# make runs as root; otherwise make stops with the command to run.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium and chromium-driver for the browser test"; \
		apt-get update && apt-get install -y chromium chromium-driver; \
	else \
		echo "the browser test needs /usr/bin/chromium and /usr/bin/chromedriver; run:" >&2; \
		echo "    sudo apt-get install chromium chromium-driver" >&2; \
		exit 1; \
	fi

bench-loss: $(STAMP)
	$(BIN)/python benchmarks/bench_loss.py

bench-eval: $(STAMP)
	$(BIN)/python benchmarks/bench_eval.py

# The search index on 1,000,000 clustered 512-d vectors (several minutes, ~5 GiB of memory).
bench-index: $(STAMP)
	$(BIN)/python benchmarks/bench_index.py

# A load test of `clipforge serve` on 127.0.0.1: 2,000 requests at concurrency 8, then hostile inputs.
bench-serve: $(STAMP)
	$(BIN)/python benchmarks/bench_serve.py

# CLIP-guided generation and best-of-16 reranking on shapes://, judged by a second model: trains
# three demo-recipe models (seeds 0 and 1 for 4,800 steps with --image-noise 0.25, seed 1 for
# 2,400 steps clean; about 80 minutes together) into runs/bench-generate/ unless they are there, then writes
# benchmarks/results/bench_generate.json and docs/figures/generate_grid.png.
bench-generate: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py

# clipforge's SigLIP B/16 against transformers' SiglipModel on the same random weights, fp32 and bf16
# (about 16 minutes on 2 CPU cores; needs transformers: make bench-siglip REF_PYTHON=<venv with transformers>/bin/python).
REF_PYTHON ?= $(BIN)/python
bench-siglip: $(STAMP)
	nice -n 10 $(REF_PYTHON) benchmarks/bench_siglip.py --threads 2

# The demo recipe trained for its own budget and for 2,400 steps: zero-shot accuracy against steps
# (about 17 minutes; runs/demo-curve/, benchmarks/results/bench_demo_curve.json, docs/figures/demo_curve.png).
bench-demo-curve: $(STAMP)
	$(BIN)/python benchmarks/bench_demo_curve.py

# The main job on built-in data: train the tiny preset on shapes://, evaluate, write runs/demo/.
demo: $(STAMP)
	$(BIN)/clipforge demo

# Debian's WenQuanYi Micro Hei for the Chinese figure labels: installed with apt-get when missing
# and make runs as root; otherwise make stops with the command to run.
fonts:
	@if [ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's fonts-wqy-microhei for the Chinese figures"; \
		apt-get update && apt-get install -y fonts-wqy-microhei; \
	else \
		echo "the Chinese figures need the WenQuanYi Micro Hei font; run:" >&2; \
		echo "    sudo apt-get install fonts-wqy-microhei" >&2; \
		exit 1; \
	fi

# Every figure in docs/figures/ that a script redraws in seconds:
#   loss_*.png and loss_*.zh.png  docs/make_loss_figures.py, from the library's loss (English and Chinese);
#   demo_curve.png                bench_demo_curve.py --replot, from benchmarks/results/bench_demo_curve.json
#                                 (the training behind it: `make bench-demo-curve`, about 17 minutes).
# Not here, because they need more than a script:
#   generate_grid.png             `make bench-generate` (about 80 minutes of training); once its images are
#                                 in runs/bench-generate/images, `bench_generate.py --redraw` redraws it;
#   search_page.png               `make figure-search`, a screenshot taken by the browser test.
figures: $(STAMP) fonts
	$(BIN)/python docs/make_loss_figures.py --lang en zh
	$(BIN)/python benchmarks/bench_demo_curve.py --replot

# The search page screenshot, docs/figures/search_page.png, taken by the browser test
# (Debian's chromium and chromium-driver, installed by `make browser`).
figure-search: $(STAMP) browser
	CLIPFORGE_REQUIRE_BROWSER=1 CLIPFORGE_SCREENSHOT=docs/figures/search_page.png \
		$(BIN)/python -m pytest -q -m slow tests/test_search_browser.py

# The wheels `make gpu-check` installs on a GPU machine that has no network, into .gpu-wheels/
# (ignored; it travels with the working tree, so it must stay small: the total is printed and
# checked).  The machine brings Python 3.12, a CUDA build of PyTorch, transformers (so numpy,
# tokenizers, safetensors, huggingface_hub, regex, tqdm, PyYAML) and timm (so torchvision):
# these are the project's other run-time and test needs, OpenCLIP and Inf-CL (pinned: what the
# check measures against) and clipforge's own wheel.  scikit-learn (digits://, the linear probe)
# and matplotlib (report figures) are left out: with SciPy they would weigh ~60 MB.
GPU_WHEELS := .gpu-wheels
GPU_WHEEL_SPECS := "ftfy>=6.1" wcwidth "webdataset>=0.2.86" "braceexpand>=0.1.7" "sentencepiece>=0.2" \
	"Pillow>=10.0" "pytest>=7" pluggy iniconfig pygments "pytest-timeout>=2" open_clip_torch==3.3.0 inf-cl==1.2.1
GPU_WHEELS_MAX_MIB := 48

gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp --abi cp312 \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d $(GPU_WHEELS) $(GPU_WHEEL_SPECS)
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w $(GPU_WHEELS) .
	rm -rf build
	@ls -1 $(GPU_WHEELS)
	@total=$$(du -sk $(GPU_WHEELS) | cut -f1); echo "$(GPU_WHEELS): $$((total / 1024)) MiB in all"; \
	if [ $$total -gt $$(( $(GPU_WHEELS_MAX_MIB) * 1024 )) ]; then \
		echo "$(GPU_WHEELS) is over $(GPU_WHEELS_MAX_MIB) MiB: too large to travel with the repository" >&2; exit 1; fi

# The GPU check, on a machine with a CUDA GPU and the folder above: the CUDA tests, then the loss,
# a training step and inference against OpenCLIP and Inf-CL, each time-boxed, in under 5 minutes.
# It uses the machine's own python3 and PyTorch, not the virtual environment; it writes
# benchmarks/results/gpu_check.json and gpu_check.md.  Without CUDA it stops at once in one line.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
