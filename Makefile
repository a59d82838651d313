# clipforge — common tasks.  Every target creates .venv if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; override for CUDA, e.g. `make test TORCH_SPEC=torch==2.13.0+cu128`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install lint test test-slow bench-loss bench-eval bench-index bench-serve bench-generate bench-demo-curve figures fonts figure-search browser demo clean

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

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
