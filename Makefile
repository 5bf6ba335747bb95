# Both targets create .venv when missing, install the project with its test
# extras, and run. Nothing is installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench leaderboard clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/harness run configs/quickstart.yaml --workdir runs/quickstart
	$(BIN)/harness leaderboard --workdir runs/quickstart

# One torch thread: the tests' tiny models run many times faster single-threaded
# (measured: tests/test_defense_pam.py 13 s vs 93 s with 2 threads on the 2-core dev box).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The published leaderboard: one page and one markdown table from leaderboard/records/*.jsonl
leaderboard: $(STAMP)
	$(BIN)/harness leaderboard --records leaderboard/records/*.jsonl --format html --out leaderboard/index.html
	$(BIN)/harness leaderboard --records leaderboard/records/*.jsonl --format markdown --out leaderboard/LEADERBOARD.md

# Timing benchmarks (benchmarks/, not part of `make test`): compared with the latest stored
# baseline of this machine and device (benchmarks/baselines/), saved as one when there is none.
# BENCH_ARGS: e.g. --save (store this run as a new baseline), -- -k train (pytest args).
BENCH_ARGS ?=
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
