# `make demo`: create the venv if needed, then the quick demo with DVC (`dvc repro evaluate`): the
#   teachers, the student distilled and the same student trained alone, and the report.
# `make demo-grounding`: the visual grounding demo (`dvc repro ground_evaluate`).
# `make demo-full`: every stage (the quick demo's, the student's export and the grounding demo);
#   FULL_SETTINGS, when set, are `dvc exp run -S` overrides (written into params.yaml:
#   `git checkout params.yaml` returns to the demo's).
# `make test`: create the venv if needed, then run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch wheels: override for another platform, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

# What the full demo changes over params.yaml (each a `dvc exp run -S` override; none by default).
FULL_SETTINGS ?=
DVC := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc
REPORT_SUMMARY = @sed -n '/^\#\# Retrieval quality/,/^\#\# Efficiency/p' reports/eval/report.md | sed '$$d'; \
	echo "Full report: reports/eval/report.md, reports/eval/index.html  (also: dvc metrics show, dvc plots show)"

.PHONY: venv demo demo-grounding demo-full test bench clean-scratch

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[demo,test]'
	touch $@

demo: venv
	$(DVC) repro evaluate
	$(REPORT_SUMMARY)

demo-grounding: venv
	$(DVC) repro ground_evaluate
	@sed '/^## Examples/,$$d' reports/ground/report.md
	@echo "Full report: reports/ground/report.md"

demo-full: venv
	$(if $(strip $(FULL_SETTINGS)),$(DVC) exp run $(addprefix -S ,$(FULL_SETTINGS)),$(DVC) repro)
	$(REPORT_SUMMARY)

test: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_teach.py
	$(PY) benchmarks/bench_teach_scaling.py
