# Each target installs what it needs on a fresh Debian machine, so `make demo` and `make test`
# work from a clean clone.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := etcd-server etcd-client containernetworking-plugins iptables nftables \
	iproute2 iputils-ping iperf3 ethtool
# Commands and files whose presence proves the apt packages are in.
SYSTEM_PROBES := etcd etcdctl ip iptables iptables-restore nft ping iperf3 ethtool
BACKEND ?= vxlan
LINT_DIRS := $(wildcard cloudroutes providers tests bench)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: system-deps venv demo test bench lint format clean test-localstack

system-deps:
	@missing=0; \
	for c in $(SYSTEM_PROBES); do command -v $$c >/dev/null || missing=1; done; \
	[ -x /usr/lib/cni/bridge ] || missing=1; \
	if [ $$missing = 1 ]; then \
		echo "installing system packages: $(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[all,test]'
	touch $@

venv: $(VENV)/.installed

demo: system-deps venv
	$(VENV)/bin/cloudroutes demo --backend $(BACKEND)

test: system-deps venv
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(PY) -m pytest --junitxml=report.xml $(PYTEST_ARGS)

bench: system-deps venv
	$(PY) -m bench $(BENCH_ARGS)

# The AWS integration tests against a LocalStack started by the user (see localstack/README.md);
# without LOCALSTACK_ENDPOINT they run against moto as part of `make test`.
test-localstack: system-deps venv
	@if [ -z "$(LOCALSTACK_ENDPOINT)" ]; then \
		echo "test-localstack: LOCALSTACK_ENDPOINT is not set; start LocalStack with" \
			"'docker compose -f localstack/docker-compose.yml up -d --wait' and run" \
			"'make test-localstack LOCALSTACK_ENDPOINT=http://127.0.0.1:4566'" >&2; \
		exit 2; \
	fi
	LOCALSTACK_ENDPOINT='$(LOCALSTACK_ENDPOINT)' $(PY) -m pytest tests/integration -k aws $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check $(LINT_DIRS)

format: venv
	$(VENV)/bin/ruff format $(LINT_DIRS)
	$(VENV)/bin/ruff check --fix $(LINT_DIRS)

clean:
	rm -rf $(VENV) report.xml *.egg-info
