#!/usr/bin/env bash
# The README's test command: set up (if needed), then run every test tier. Extra arguments go to both pytest runs,
# e.g. `scripts/test.sh -x`, `scripts/test.sh tests/test_export.py`, `scripts/test.sh -k serve`.
#
#   1. unit + integration, in one pytest process: the unit tests first (no Ray, no S3), then the integration
#      tests, which share one SeaweedFS S3 and one local Ray that stop when this process ends;
#   2. e2e, in a second pytest process: tests that start their own Ray (a `ray start` head, the pipeline
#      subprocess), so no other Ray may be alive.
#
# Both tiers always run, and the script fails if either fails. pytest's exit code 5 (no tests collected) is
# success for a tier that the arguments leave empty, but not when they select no test in either tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

NO_TESTS=5
trap 'exit 130' INT

run_tier() {  # run_tier MARK_EXPRESSION [PYTEST ARGS...]; sets rc
    local expression=$1
    shift
    echo "=== pytest -m \"$expression\" $*"
    rc=0
    .venv/bin/python -m pytest -m "$expression" "$@" || rc=$?
}

run_tier "unit or integration" "$@"
first=$rc
run_tier "e2e" "$@"
second=$rc

if [[ $first -eq $NO_TESTS && $second -eq $NO_TESTS ]]; then
    echo "error: no tests selected in any tier" >&2
    exit "$NO_TESTS"
fi
status=0
for code in "$first" "$second"; do
    if [[ $code -ne 0 && $code -ne $NO_TESTS ]]; then
        status=$code
    fi
done
echo "=== unit + integration: exit $first; e2e: exit $second"
exit "$status"
