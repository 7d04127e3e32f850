# Two set-up commands: `make demo` and `make test`. Both build the virtual environment on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segsentry-installed
# The demo runs in a lean runtime environment: numpy, SimpleITK, onnx, onnxruntime, typer, rich — no torch.
RUNTIME_VENV ?= .venv-runtime
RUNTIME_STAMP := $(RUNTIME_VENV)/.segsentry-installed
DEMO_OUT ?= demo-output

.PHONY: install demo test test-all bench clean dicom-tools

$(STAMP): pyproject.toml requirements/cpu-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the local CPU wheel (a newer torch would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements/cpu-dev.txt torch==2.13.0
	# nnU-Net (the test oracle) without its timm -> torchvision -> newer-torch chain; nothing imports timm
	$(BIN)/python -m pip install --quiet --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(RUNTIME_STAMP): pyproject.toml
	$(PY) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/python -m pip install --quiet -e .
	touch $(RUNTIME_STAMP)

install: $(STAMP)

# Exit code 3 means "a case was flagged OOD", which is what the demo shows.
demo: $(RUNTIME_STAMP)
	$(RUNTIME_VENV)/bin/ood-run --demo -o $(DEMO_OUT) || [ $$? -eq 3 ]

# The DICOM tests use a real PACS (Orthanc) and dciodvfy (dicom3tools), both Debian packages; as root with apt-get
# they are installed once (a no-op when present), otherwise those tests skip and say why.
dicom-tools:
	@if command -v Orthanc >/dev/null && command -v dciodvfy >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			orthanc dicom3tools >/dev/null; \
	else echo "Orthanc/dciodvfy missing and not root: the DICOM PACS tests will skip"; fi

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) $(DEMO_OUT) .pytest_cache build *.egg-info
