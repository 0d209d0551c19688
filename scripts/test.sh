#!/usr/bin/env bash
# Install deepe with everything its tests need, check it, and run the tests.
# This is the README's test command; .ci/run calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet -c constraints/ci.txt -e '.[train,monitor,api,test]'
ruff check --output-format concise deepe_tasks method_store tests scripts bench
mypy
set +e
python -m pytest -q "$@"
code=$?
set -e
# Exit code 5 means pytest collected no tests: treat it as a failure, loudly.
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$code"
