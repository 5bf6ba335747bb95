# Both targets create .venv when missing and install into it; nothing is installed by hand.
# `quickstart` needs only the project (.venv/.installed-base), `test` adds the test extras
# (.venv/.installed). --no-compile: bytecode is compiled on first import, of what is imported
# (measured: 114 s -> 68 s to install, see README "Quickstart").
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed

.PHONY: quickstart test bench leaderboard readme-tables clean device-bundle

$(BASE): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(BIN)/pip install -q --no-compile -e '.[test]'
	touch $(STAMP)

quickstart: $(BASE)
	$(BIN)/harness run configs/quickstart.yaml --workdir runs/quickstart
	$(BIN)/harness leaderboard --workdir runs/quickstart --explain

# One torch thread: the tests' tiny models run many times faster single-threaded
# (measured: tests/plugins/defenses/test_defense_pam.py 13 s vs 93 s with 2 threads on the 2-core dev box).
# -n 2 --dist loadfile (pytest-xdist): two pytest processes, one per core of the 2-core box, each test file on one of them.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# The published leaderboard: one page and one markdown table from leaderboard/records/*.jsonl
leaderboard: $(STAMP)
	$(BIN)/harness leaderboard --records leaderboard/records/*.jsonl --format html --out leaderboard/index.html
	$(BIN)/harness leaderboard --records leaderboard/records/*.jsonl --format markdown --out leaderboard/LEADERBOARD.md

# The README's measured tables and timings and its GPU queue table, regenerated from the files their markers
# cite (`make test` fails while they disagree: tests/leaderboard/test_readme.py); the generator is
# backdoor_harness.leaderboard.readme, run by the script with the core's file readers. The quickstart's clock and
# records come from scripts/time-quickstart (a fresh clone, minutes), run before this.
readme-tables: $(STAMP)
	$(BIN)/python scripts/readme-tables README.md

# Timing benchmarks (benchmarks/, not part of `make test`): compared with the latest stored
# baseline of this machine and device (benchmarks/baselines/), saved as one when there is none.
# BENCH_ARGS: e.g. --save (store this run as a new baseline), -- -k train (pytest args).
BENCH_ARGS ?=
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# What a GPU machine lacks, in one git-ignored folder the device tool carries (`carry: [.device]`), read
# there by scripts/device-run: the project wheel (this working tree, built by the venv's pip), the cp312
# wheels of ../shared/device-wheels (pydantic and its dependencies) and the CIFAR-10 archive, with a
# MANIFEST.txt (commit, files, sizes, sha256). At most DEVICE_MAX_MIB (the device tool carries 64 MiB in all).
DEVICE_DIR ?= .device
DEVICE_WHEELS ?= ../shared/device-wheels
DEVICE_DATA ?= ../shared/datasets/cifar10-jpeg.tar.gz
DEVICE_MAX_MIB ?= 60
device-bundle: $(STAMP)
	@test -d $(DEVICE_WHEELS) || { echo "device-bundle: no wheel folder $(DEVICE_WHEELS) (set DEVICE_WHEELS)" >&2; exit 1; }
	@test -f $(DEVICE_DATA) || { echo "device-bundle: no CIFAR-10 archive $(DEVICE_DATA) (set DEVICE_DATA)" >&2; exit 1; }
	rm -rf $(DEVICE_DIR) build/lib build/bdist.*
	mkdir -p $(DEVICE_DIR)/wheels $(DEVICE_DIR)/data
	$(BIN)/pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check -w $(DEVICE_DIR)/wheels .
	cp $(DEVICE_WHEELS)/*.whl $(DEVICE_DIR)/wheels/
	cp $(DEVICE_DATA) $(DEVICE_DIR)/data/cifar10-jpeg.tar.gz
	@total=$$(du -sb $(DEVICE_DIR) | cut -f1); limit=$$(( $(DEVICE_MAX_MIB) * 1048576 )); \
	{ echo "# device bundle for scripts/device-run (make device-bundle)"; \
	  echo "commit: $$(git rev-parse HEAD 2>/dev/null || echo unknown)$$(test -z "$$(git status --porcelain 2>/dev/null)" || echo ' (+ uncommitted changes)')"; \
	  echo "built: $$(date -u +%Y-%m-%dT%H:%M:%SZ)"; \
	  echo "total: $$total bytes (limit $(DEVICE_MAX_MIB) MiB)"; \
	  echo "# bytes sha256 path"; \
	  (cd $(DEVICE_DIR) && find . -type f ! -name MANIFEST.txt | sort | while read -r f; do \
	    echo "file: $$(stat -c %s "$$f") $$(sha256sum "$$f" | cut -d' ' -f1) $${f#./}"; done); \
	} > $(DEVICE_DIR)/MANIFEST.txt; \
	if [ $$total -gt $$limit ]; then \
	  echo "device-bundle: $(DEVICE_DIR) is $$(( total / 1048576 )) MiB, over the $(DEVICE_MAX_MIB) MiB limit (the device tool carries at most 64 MiB with the working tree); see $(DEVICE_DIR)/MANIFEST.txt for what is in it" >&2; \
	  exit 1; fi; \
	echo "device-bundle: $(DEVICE_DIR) holds $$(ls $(DEVICE_DIR)/wheels | wc -l) wheels and the CIFAR-10 archive, $$(( total / 1024 )) KiB of $(DEVICE_MAX_MIB) MiB"

clean:
	rm -rf runs .pytest_cache
