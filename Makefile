# The two commands of the README: `make demo` (the main job) and `make test`.
# Both build the virtual environment first when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,logging,data,notebooks]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/imgalign demo --out runs/demo --overwrite

test: venv
	$(PY) -m pytest tests

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf runs build *.egg-info
