# Two commands for a new user: `make demo` (the main job on the embedded synthetic world) and
# `make test`. Each creates the virtualenv (.venv) when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo deploy test lint venv clean bench models

$(BIN)/fedrec: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	@touch $(BIN)/fedrec

venv: $(BIN)/fedrec

demo: venv
	$(BIN)/fedrec simulate --out runs/demo

# A real Flower Deployment Engine federation on 127.0.0.1 (docs/deploy.md): about 1.5 minutes.
deploy: venv
	$(BIN)/fedrec deploy local --devices 4 --rounds 3 --tls --out runs/deploy

test: venv
	$(BIN)/python -m pytest -q

# ruff (style, imports, complexity <= 15), mypy with the package-dir mapping (see [tool.mypy] in
# pyproject.toml), then no function in the package longer than 60 lines.
lint: venv
	$(BIN)/ruff check fedrec clients server tests benchmarks scenarios tools
	$(BIN)/python tools/typecheck.py fedrec clients server
	$(BIN)/python tools/check_shape.py fedrec clients server

# Speed and memory benchmarks (by hand; about an hour and a half on 2 cores, the last one an hour of it).
# Each prints ratios against a baseline measured in the same run; see docs/performance.md.
bench: venv
	$(BIN)/python benchmarks/bench_aggregate.py --out runs/bench
	$(BIN)/python benchmarks/bench_step.py --out runs/bench
	$(BIN)/python benchmarks/bench_throughput.py --out runs/bench
	$(BIN)/python benchmarks/bench_rss.py
	$(BIN)/python benchmarks/bench_population.py
	$(BIN)/python benchmarks/bench_deploy.py --out runs/bench
	$(BIN)/python benchmarks/bench_secagg.py --out runs/bench
	$(BIN)/python benchmarks/bench_million.py --out runs/bench/million

# The docs/models.md table: mf, neumf and sasrec on MovieLens replayed by time, with and without DP
# (about 25 minutes on 2 cores; DATA=path/to/ratings.csv, default ../shared/data/ml-latest-small).
DATA ?= ../shared/data/ml-latest-small/ratings.csv
models: venv
	$(BIN)/python scenarios/models_movielens.py --data $(DATA) --out runs/models

clean:
	rm -rf runs .pytest_cache
