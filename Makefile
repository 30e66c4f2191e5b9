# Two commands do all set-up on a fresh machine (Python >= 3.11 and make are all they need):
#   make serve   installs everything into .venv and runs the gateway on its embedded defaults
#   make test    installs everything into .venv and runs the test suite
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed

.PHONY: serve test install clean

serve: $(STAMP)
	$(VENV)/bin/mailgw serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest $(ARGS)

install: $(STAMP)

# Reinstall whenever the pinned dependencies change.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
