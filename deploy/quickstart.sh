#!/usr/bin/env bash
# Set up swarmtrain in ./.venv (once), then run the demo or the test suite.
#
#   deploy/quickstart.sh demo [--workers N] [--seconds S]   a local swarm: coordinator + N CPU workers
#   deploy/quickstart.sh standalone [worker flags...]      train the tiny GPT-J in one process
#   deploy/quickstart.sh test [pytest flags...]            run the test suite (all of it by default;
#                                                          -m "not multiprocess" for the fast part alone)
#   deploy/quickstart.sh faults [pytest flags...]          the fault suite: each fault tried with real
#                                                          processes; results in fault-report.json
#
# On a machine without an NVIDIA GPU, torch is installed first as the CPU build, so the
# plain `torch` requirement does not pull several GB of CUDA libraries. Elsewhere, point
# PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index if your package index lacks one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${SWARMTRAIN_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup() {
    local extras=$1
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: swarmtrain needs Python 3.11 or newer ($PYTHON is $("$PYTHON" -V 2>&1)); set PYTHON=python3.11" >&2
        exit 2
    fi
    [ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
    if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            say "installing torch (CUDA build: an NVIDIA GPU is present)"
            "${pip[@]}" install torch
        else
            say "installing torch $TORCH_CPU_VERSION (CPU build: no NVIDIA GPU found)"
            "${pip[@]}" install "torch==$TORCH_CPU_VERSION"
        fi
    fi
    # The install is editable: only a change of pyproject.toml (dependencies, entry points) or of
    # the extras asks for another pip run, so a second `test` or `demo` starts at once.
    local stamp="$VENV/.swarmtrain-installed" want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${extras:-none}"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "installing swarmtrain${extras:+ [$extras]}"
        "${pip[@]}" install --editable ".${extras:+[$extras]}"
        echo "$want" > "$stamp"
    fi
}

# Debian packages the tests run for real: `ensure_package PACKAGE WHY COMMAND...` installs
# PACKAGE when one of its COMMANDs is missing (as root), and warns otherwise.
ensure_package() {
    local package="$1" why="$2" missing=0 cmd
    shift 2
    for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
    [ "$missing" -eq 0 ] && return
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing $package (Debian package: $why)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$package" >/dev/null ||
            { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "$package" >/dev/null; }
    else
        echo "warning: $package is not installed; the tests that need it ($why) will fail." \
             "Install it (e.g. sudo apt-get install $package) and run again." >&2
    fi
}

run_pytest() {
    local status=0
    "$VENV/bin/python" -m pytest "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "error: pytest collected no tests" >&2
        exit 1
    fi
    exit "$status"
}

case "${1:-}" in
    demo)
        shift
        setup ""
        say "a local swarm trains the tiny GPT-J on the embedded corpus"
        exec "$VENV/bin/python" deploy/local_swarm.py "$@"
        ;;
    standalone)
        shift
        setup ""
        say "training the tiny GPT-J in one process on the embedded corpus"
        exec "$VENV/bin/worker" --standalone --config tiny "$@"
        ;;
    test)
        shift
        setup test
        ensure_package prometheus "the metrics tests run a real server" prometheus promtool
        ensure_package chromium "the swarm page is tested in a headless browser" chromium
        ensure_package iptables "the NAT tests build home routers that masquerade" iptables
        say "running the test suite"
        run_pytest "$@"
        ;;
    faults)
        shift
        setup test
        say "running the fault suite (kills, restarts, liars, lost stages: real processes)"
        run_pytest -m fault --fault-report fault-report.json "$@"
        ;;
    *)
        echo "usage: deploy/quickstart.sh demo|standalone|test|faults [flags...]" >&2
        exit 2
        ;;
esac
