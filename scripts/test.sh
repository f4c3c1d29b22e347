#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up (scripts/install.sh), lint,
# type-check, then pytest. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
scripts/install.sh
venv=${L4GW_VENV:-$here/.venv}
echo "== ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check gateway plugins
"$venv/bin/hadolint" Containerfile
echo "== mypy (strict)"
"$venv/bin/mypy" gateway plugins
echo "== pytest"
exec "$venv/bin/pytest" -q -p no:cacheprovider "$@"
