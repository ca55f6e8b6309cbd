# Sourced by launch.sh and tests/run.sh: creates .venv from requirements.txt on first use (and when
# requirements.txt changes), then activates it. Set PIPEGPT_PYTHON to pick the interpreter.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_stamp="$_root/.venv/.requirements.sha"
_want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$_root/.venv/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "setting up $_root/.venv (first run: a few minutes)" >&2
  "${PIPEGPT_PYTHON:-python3}" -m venv "$_root/.venv"
  "$_root/.venv/bin/python" -m pip install -q --upgrade pip
  "$_root/.venv/bin/python" -m pip install -q -r "$_root/requirements.txt"
  echo "$_want" > "$_stamp"
fi
source "$_root/.venv/bin/activate"
