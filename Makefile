# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: install demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# A CPU-only machine must never pull the multi-GB CUDA wheels. With a GPU: the regular build.
	@# Without: a torch wheel pip's configured find-links provide (a local CPU build), its dependencies
	@# from the package index; failing that, the CPU build from PyTorch's own index.
	@if $(PY) -c "import torch" 2>/dev/null; then :; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	elif $(PY) -m pip install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); \
	else $(PY) -m pip install -q torch==$(TORCH_VERSION) \
		--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

DEMO_MEDIA_N := 2000
DEMO_MEDIA_SECONDS := 120
DEMO_AUDIO := tiny,sample_rate=8000,n_fft=200,hop_length=80,n_mels=40,max_seconds=1,ctc=0.5

# Trains on the built-in corpus (the Python standard library) for three minutes, then writes code.
demo: install
	rm -rf runs/demo
	$(VENV)/bin/omnigpt train --out runs/demo --preset micro --optimizer muon \
		--max-seconds 180 --eval-interval 200
	$(VENV)/bin/omnigpt generate --model runs/demo --max-new-tokens 300 --temperature 0.7 --top-k 40 --seed 0 "def "
	@# Then a small model that sees and hears, trained from nothing on the built-in data (about two
	@# minutes), captions an image and transcribes a keypad clip it has never met.
	rm -rf runs/demo-media
	$(VENV)/bin/omnigpt make-data shapes keypad --out runs/demo-media/data -n $(DEMO_MEDIA_N) --seed 1 \
		--no-questions --max-shapes 1 --max-digits 2
	$(VENV)/bin/omnigpt train --data runs/demo-media/data/all.jsonl --out runs/demo-media/run --preset nano \
		--vision tiny --audio $(DEMO_AUDIO) --batch-size 32 --lr 2e-3 \
		--max-seconds $(DEMO_MEDIA_SECONDS) --eval-interval 500
	$(VENV)/bin/omnigpt make-data shapes keypad --out runs/demo-media/new -n 1 --seed 2026 --max-shapes 1 --max-digits 2
	@echo "image runs/demo-media/new/images/2026-00000.png, truly: $$(head -1 runs/demo-media/new/shapes.jsonl | cut -d'"' -f12)"
	@echo -n "the model's caption: "; $(VENV)/bin/omnigpt caption --model runs/demo-media/run runs/demo-media/new/images/2026-00000.png
	@echo "clip runs/demo-media/new/audio/2026-00000.wav, truly: $$(head -1 runs/demo-media/new/keypad.jsonl | cut -d'"' -f12)"
	@echo -n "the model's transcript: "; $(VENV)/bin/omnigpt transcribe --model runs/demo-media/run runs/demo-media/new/audio/2026-00000.wav

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/shakespeare_char.py --data ../shared/data/tinyshakespeare/input.txt --seconds 90
	$(PY) benchmarks/generation_speed.py
	$(PY) benchmarks/hf_interop.py
	@# about 55 minutes: pretraining, full fine-tuning and LoRA, each within the 30-minute budget
	$(PY) benchmarks/multi30k.py --data ../shared/data/multi30k --out runs/multi30k-$$(date +%Y%m%d-%H%M%S)

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
