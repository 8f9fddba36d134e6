# Shared by scripts/demo and scripts/test: one virtual environment, installed from pyproject.toml.
VENV=${EDGEMED_VENV:-.venv}
ensure_venv() {
  local extras=$1
  local py=${PYTHON:-python3}
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment $VENV ($($py --version))"
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  local stamp="$VENV/.edgemed-installed-$extras"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing edgemed[$extras] into $VENV (first run: a few minutes)"
    "$VENV/bin/python" -m pip install -q -e ".[$extras]"
    touch "$stamp"
  fi
}
