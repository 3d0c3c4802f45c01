# Developer tasks. The default test run (pytest) does not include fuzzing.

PYTHON ?= .venv/bin/python
PIP ?= .venv/bin/pip
# Bounded so `make fuzz` always ends; raise it for a longer campaign.
FUZZ_SECONDS ?= 60

.PHONY: fuzz fuzz-frames fuzz-messages
# Fuzz the frame decoder and the message decoder with atheris (libFuzzer), FUZZ_SECONDS
# each. Crash inputs land in fuzz/crashes/; each harness's docstring says how a crash
# becomes a regression test (fuzz/regressions/ + a named test) before the bug is fixed.
fuzz: fuzz-frames fuzz-messages

fuzz-frames:
	@$(PYTHON) -c "import atheris" 2>/dev/null || $(PIP) install atheris
	@mkdir -p fuzz/crashes fuzz/corpus
	PYTHONPATH=. $(PYTHON) fuzz/fuzz_frames.py -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=fuzz/crashes/ fuzz/corpus

fuzz-messages:
	@$(PYTHON) -c "import atheris" 2>/dev/null || $(PIP) install atheris
	@mkdir -p fuzz/crashes fuzz/corpus-messages
	PYTHONPATH=. $(PYTHON) fuzz/fuzz_messages.py -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=fuzz/crashes/messages- fuzz/corpus-messages
