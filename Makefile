# clipforge — common tasks.  Every target creates .venv if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; override for CUDA, e.g. `make test TORCH_SPEC=torch==2.13.0+cu128`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install lint test test-slow bench-loss bench-eval bench-index bench-serve bench-generate bench-demo-curve figures figure-search browser demo clean

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
# 2,400 steps clean; about 80 minutes together) into runs/generate-proof/ unless they are there, then writes
# benchmarks/results/bench_generate.json and docs/figures/generate_grid.png.
bench-generate: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py

# The demo recipe trained for its own budget and for 2,400 steps: zero-shot accuracy against steps
# (about 17 minutes; runs/demo-curve/, benchmarks/results/bench_demo_curve.json, docs/figures/demo_curve.png).
bench-demo-curve: $(STAMP)
	$(BIN)/python benchmarks/bench_demo_curve.py

# The main job on built-in data: train the tiny preset on shapes://, evaluate, write runs/demo/.
demo: $(STAMP)
	$(BIN)/clipforge demo

figures: $(STAMP)
	$(BIN)/python docs/make_loss_figures.py

# The search page screenshot, docs/figures/search_page.png, taken by the browser test
# (Debian's chromium and chromium-driver, installed by `make browser`).
figure-search: $(STAMP) browser
	CLIPFORGE_REQUIRE_BROWSER=1 CLIPFORGE_SCREENSHOT=docs/figures/search_page.png \
		$(BIN)/python -m pytest -q -m slow tests/test_search_browser.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
