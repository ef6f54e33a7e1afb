# Everything installs into .venv through requirements/constraints.txt (the one version truth, shared
# with both Dockerfiles; regenerate with `python requirements/lock.py`). torch goes in first, at the
# locked version, so pip takes the local CPU build where there is one instead of a CUDA build.
LOCK := requirements/constraints.txt
TORCH_VERSION := $(shell sed -n 's/^torch==\([^ ;]*\).*/\1/p' $(LOCK))
PYTHON_VERSION := $(shell sed -n 's/^\# python_version: *//p' $(LOCK))
PYTHON ?= $(shell command -v python$(PYTHON_VERSION) || echo python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)

.PHONY: install envtest test demo demo-trainer lint chaos bench crd clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; v == "$(PYTHON_VERSION)" or print(f"warning: $(VENV) runs Python {v}; $(LOCK) was resolved for $(PYTHON_VERSION)")'
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c $(LOCK) -e '.[trainer,operator,dev,bench]'
	rm -f $(VENV)/.installed-* && touch $@

# A real control plane for the Kubernetes tier, envtest-style: ../shared/envtest's archive unpacks
# into .cache/envtest and KUBEBUILDER_ASSETS points at it (unless already set). Without the
# archive the tier runs on the emulator only.
ENVTEST_ARCHIVE := $(firstword $(wildcard ../shared/envtest/kubernetes-*-linux-amd64.tar.xz))
ENVTEST_DIR := .cache/envtest
ifneq ($(ENVTEST_ARCHIVE),)
KUBEBUILDER_ASSETS ?= $(abspath $(ENVTEST_DIR))/bin
export KUBEBUILDER_ASSETS
ENVTEST_STAMP := $(ENVTEST_DIR)/.unpacked
endif

envtest: $(ENVTEST_STAMP)

$(ENVTEST_DIR)/.unpacked: $(ENVTEST_ARCHIVE)
	cd $(dir $<) && sha256sum --quiet -c --ignore-missing SHA256SUMS
	mkdir -p $(ENVTEST_DIR) && tar -xJf $< -C $(ENVTEST_DIR) && touch $@

test: install envtest
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=25

demo: install envtest
	HF_HUB_OFFLINE=1 $(PY) -m lora_operator.demo

demo-trainer: install
	HF_HUB_OFFLINE=1 $(PY) -m lora_trainer.demo

lint: install
	$(PY) -m ruff check .

KILLS ?= 100
chaos: install envtest
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow
	HF_HUB_OFFLINE=1 $(PY) -m tests.e2e.chaos --kills $(KILLS)

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/run_all.py

crd: install
	$(VENV)/bin/lora-operator crd > crds/loratrainingjobs.lora-operator.dev.yaml

clean:
	rm -rf .demo .dev
include docs/make-images.mk
