# `make demo`: create the venv if needed, then run the whole pipeline with DVC.
# `make test`: create the venv if needed, then run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch wheels: override for another platform, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test bench clean-scratch

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[demo,test]'
	touch $@

demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro
	@sed -n '/^## Retrieval quality/,/^## Efficiency/p' reports/eval/report.md | sed '$$d'
	@echo "Full report: reports/eval/report.md  (also: dvc metrics show, dvc plots show)"

test: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_teach.py
	$(PY) benchmarks/bench_teach_scaling.py
