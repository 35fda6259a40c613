# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install microdiff, run the demo
#   make test   - create .venv, install microdiff[dev], run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench clean

setup:
	@VENV=$(VENV) EXTRAS=dev bash scripts/setup_env.sh

demo: setup
	$(PY) -m microdiff demo --out runs/demo

# pytest exits 5 when it collects no tests: that is a failure here, said in words.
test: setup
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

bench: setup
	$(PY) benchmarks/samplers.py
	$(PY) benchmarks/models.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
