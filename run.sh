#!/usr/bin/env bash
# Set up the project in .venv (Python 3.11, CPU torch) and run the demo or the tests.
#   bash run.sh demo [demo.py args]    synthesize a cohort, convert it, train, evaluate (CPU)
#   bash run.sh test [pytest args]     the whole test suite (starts a local SLURM cluster as root)
#   bash run.sh test --quick [args]    the fast tier for everyday work: no slow, no SLURM tests
#   bash run.sh setup                  only create/update .venv
set -euo pipefail
cd "$(dirname "$0")"

pick_python() {
    for p in "${PYTHON:-}" python3.11 python3; do
        [ -n "$p" ] || continue
        if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            echo "$p"; return 0
        fi
    done
    echo "run.sh: Python 3.11 not found; install it or set PYTHON=/path/to/python3.11" >&2
    exit 1
}

setup() {
    if [ ! -x .venv/bin/python ]; then
        "$(pick_python)" -m venv .venv
    fi
    # Re-install only when the dependency list changed (stamp = hash of pyproject.toml).
    local stamp=.venv/.masan-installed want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        .venv/bin/python -m pip install -q --upgrade pip
        # torch first, pinned: the CPU build on this machine's disk (an unpinned torch pulls CUDA).
        .venv/bin/python -m pip install -q torch==2.13.0
        .venv/bin/python -m pip install -q -e '.[test]'
        echo "$want" > "$stamp"
    fi
}

# The QC report's browser test (tests/test_qc_report.py) drives a headless Chromium through
# playwright. Idempotent and cheap when one is there: a system Chromium (as root: Debian's
# chromium-headless-shell, ~100 MB download, ~25 s), else playwright's own build, kept in
# .venv/ms-playwright. Without either the test is skipped, naming what is missing.
BROWSERS_DIR=.venv/ms-playwright
install_browser() {
    local b
    for b in chromium-headless-shell chromium chromium-browser google-chrome; do
        command -v "$b" >/dev/null 2>&1 && return 0
    done
    compgen -G "$BROWSERS_DIR/chromium*" >/dev/null && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: installing chromium-headless-shell with apt-get (once) for the QC report's browser test"
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null; then
            return 0
        fi
    fi
    PLAYWRIGHT_BROWSERS_PATH="$PWD/$BROWSERS_DIR" .venv/bin/python -m playwright install chromium-headless-shell \
        || echo "run.sh: no headless browser could be installed; tests/test_qc_report.py's browser test will be skipped" >&2
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    demo)  setup; exec .venv/bin/python launch/demo.py "$@" ;;
    test)
        setup; install_browser
        if [ "${1:-}" = "--quick" ]; then
            shift; exec .venv/bin/python -m pytest tests -m "not slow and not slurm" "$@"
        fi
        # the slowest tests listed, so that the markers of the quick tier stay honest
        exec .venv/bin/python -m pytest tests --durations=25 "$@" ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) echo "usage: bash run.sh demo [demo.py args] | test [--quick] [pytest args] | setup  (see --help)" >&2; exit 2 ;;
esac
