# dpemu: `sudo make run` and `sudo make test` install what they need, then run.
# Everything Python goes into .venv, made from Debian's python3 with
# --system-site-packages so that it sees Debian's Mininet (the PyPI wheel has no mnexec).

SYSTEM_PYTHON := /usr/bin/python3
VENV          := .venv
STAMP         := $(VENV)/.installed
APT_PACKAGES  := mininet iperf3 libiperf0 iproute2 python3-venv python3-pip procps tmux tcpdump iputils-ping openssh-server openssh-client
SCENARIO      ?= default
PYTEST_ARGS   ?=

.PHONY: run test install root check plan clean-env

run: root install
	$(VENV)/bin/dpemu run $(SCENARIO)

test: root install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

plan: install
	$(VENV)/bin/dpemu plan $(SCENARIO)

check: install
	$(VENV)/bin/dpemu check

install: $(STAMP)

root:
	@if [ "$$(id -u)" != 0 ]; then echo "dpemu needs root (namespaces, tc, apt): use sudo make $(MAKECMDGOALS)"; exit 1; fi

$(STAMP): setup.cfg pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	[ -x $(VENV)/bin/python ] || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@# byte-compile dpemu now: a run's first processes (a dozen iperf3 ends, the daemons) would otherwise all
	@# compile it at once, and that CPU burst alone can fail the first run's fidelity verdict
	$(VENV)/bin/python -m compileall -q emulator topologies traffic daemons scenarios
	touch $(STAMP)

clean-env:
	rm -rf $(VENV) *.egg-info
