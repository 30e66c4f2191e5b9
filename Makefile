# Two commands do all set-up on a fresh machine (Python >= 3.11 and make are all they need):
#   make serve   installs everything into .venv and runs the gateway on its embedded defaults
#   make test    installs everything into .venv (and Debian's Dovecot, which the IMAP tests run)
#                and runs the test suite
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed

.PHONY: serve test install system-packages clean

serve: $(STAMP)
	$(VENV)/bin/mailgw serve $(ARGS)

# The property-based tests replay the same generated examples every run (a red build can be
# reproduced); `make test HYPOTHESIS_PROFILE=default` tries new ones each run.
HYPOTHESIS_PROFILE ?= ci
test: $(STAMP) system-packages
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(VENV)/bin/pytest $(ARGS)

# The tests start their own Dovecot (tests/dovecot.py) on a loopback port; only the binary is
# needed. Installed once, as root or through sudo; nothing is started or enabled system-wide.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
system-packages:
	@command -v dovecot >/dev/null 2>&1 || { \
	  echo "installing Debian's dovecot-imapd for the IMAP tests"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends dovecot-imapd >/dev/null; }

install: $(STAMP)

# Reinstall whenever the pinned dependencies change.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
