# Two commands do everything on a fresh machine (Python 3.11, Java 17 and Maven installed):
#   make demo   set up, start the local Kafka broker, run the pipeline and report
#   make test   set up and run the test suite against a real broker
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
JARS   := .kafka/lib/.resolved
# Prometheus from Debian's package, unpacked locally (not installed as a service), for the test that
# reads streamrec metrics back through a real Prometheus; without apt the test skips.
PROM   := .tools/prometheus/usr/bin/prometheus

.PHONY: setup demo test bench clean kafka-stop

setup: $(STAMP) $(JARS)

# A first install (PyTorch from PyPI with its CUDA libraries) takes about 6.1 GiB and peaks near 9.1 GiB
# while the wheels are unpacked; say so before pip runs out of room halfway through.
$(STAMP): pyproject.toml
	@test -x $(PY) || { $(PYTHON) -c 'import shutil, sys; free = shutil.disk_usage(".").free / 2**30; \
	  sys.exit(0 if free >= 9.5 else f"make: only {free:.1f} GiB free here; the first install needs about 9.5 GiB")' \
	  && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev,bench]'
	@rm -f $(VENV)/.installed-* && touch $@

$(JARS): compose/kafka/pom.xml $(STAMP)
	$(PY) -c "from stream.tools.kafka_local import ensure_jars; ensure_jars(quiet=True)"

demo: setup
	$(VENV)/bin/streamrec demo $(DEMO_ARGS)

$(PROM):
	@mkdir -p .tools && cd .tools && { apt-get download prometheus >/dev/null 2>&1 \
	  && dpkg -x prometheus_*.deb prometheus && rm -f prometheus_*.deb; } \
	  || echo "note: Debian's prometheus package is not available here; its test will skip"

test: setup $(PROM)
	PATH="$(CURDIR)/.tools/prometheus/usr/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	for b in ingest learner rcf serving bias ope feedback; do $(PY) -m bench.$$b --quick || exit 1; done

kafka-stop:
	-$(VENV)/bin/streamrec kafka stop

clean: kafka-stop
	rm -rf $(VENV) .kafka .streamrec .tools runs
