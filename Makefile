# Developer tasks. The default test run (pytest) does not include fuzzing.

PYTHON ?= .venv/bin/python
PIP ?= .venv/bin/pip
# Bounded so `make fuzz` always ends; raise it for a longer campaign.
FUZZ_SECONDS ?= 60

.PHONY: fuzz
# Fuzz the frame decoder with atheris (libFuzzer). Crash inputs land in fuzz/crashes/;
# turn each one into a regression test in tests/test_frames.py before fixing the bug.
fuzz:
	@$(PYTHON) -c "import atheris" 2>/dev/null || $(PIP) install atheris
	@mkdir -p fuzz/crashes fuzz/corpus
	PYTHONPATH=. $(PYTHON) fuzz/fuzz_frames.py -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=fuzz/crashes/ fuzz/corpus
