#!/usr/bin/env bash
# Single entry point: sets up the Python environments on first use, then runs a subcommand.
#   ./run.sh demo [ARGS]       train the built-in tiny model on the bundled demo concept (CPU, a few minutes)
#   ./run.sh test [PYTEST...]  run the tests with the WebUI pins (.venv) and the Forge pins (.venv-forge)
#   ./run.sh convert ARGS      python -m dreambooth_ext convert ARGS
#   ./run.sh ui [ARGS]         the DreamBooth tab as a standalone page on http://127.0.0.1:7870
#   ./run.sh bench NAME [ARGS] python bench/NAME.py ARGS
#   ./run.sh gpu-check [ARGS]  real-size random-weight SD1.5/SDXL runs on an NVIDIA GPU, < 8 minutes (--dry-run: CPU)
#   ./run.sh py ARGS           the project's Python (.venv) with ARGS
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

TORCH_PIN="torch==2.13.0"   # CPU build; installed before anything else so nothing upgrades it

usage() {
    cat <<'EOF'
usage: ./run.sh COMMAND [ARGS...]
  demo [ARGS]        run the main job on a built-in default (python -m dreambooth_ext demo)
  test [PYTEST...]   run the tests with the WebUI pins (.venv) and the Forge pins (.venv-forge)
  convert ARGS       python -m dreambooth_ext convert ARGS
  ui [ARGS]          serve the DreamBooth tab on http://127.0.0.1:7870 (--port, --models-dir)
  bench NAME [ARGS]  python bench/NAME.py ARGS
  gpu-check [ARGS]   train real-size random-weight SD1.5/SDXL models briefly on the GPU and print a table
  py ARGS            run the project's Python (.venv) with ARGS
EOF
}

# find_python MINOR [EXTRA...]: the first interpreter that is Python 3.MINOR (python3.MINOR, pyenv's, EXTRA).
find_python() {
    local minor="$1" candidate
    shift
    for candidate in "python3.$minor" "$HOME"/.pyenv/versions/3."$minor"*/bin/python "$@"; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != (3, $minor))" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# ensure_venv DIR REQUIREMENTS: create DIR on first use; (re)install when REQUIREMENTS or the torch
# pin changed since the last successful install (a hash kept in DIR/.requirements-stamp).
ensure_venv() {
    local venv="$1" requirements="$2"
    local stamp="$venv/.requirements-stamp"
    local want
    want="$( { echo "$TORCH_PIN"; cat "$requirements"; } | sha256sum | cut -d' ' -f1)"
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        local python
        if ! python="$(find_python 11 python3)"; then
            echo "run.sh: Python 3.11 is needed to create $venv, but none was found (tried python3.11, ~/.pyenv/versions/3.11*, python3)." >&2
            exit 1
        fi
        echo "run.sh: creating $venv with $python" >&2
        "$python" -m venv "$venv"
    fi
    echo "run.sh: installing $TORCH_PIN and $requirements into $venv" >&2
    rm -f "$stamp"
    "$venv/bin/python" -m pip install -q "$TORCH_PIN" >&2
    # The constraint keeps every later install from replacing the torch build installed above.
    echo "$TORCH_PIN" >"$venv/.torch-constraint.txt"
    "$venv/bin/python" -m pip install -q -r "$requirements" -c "$venv/.torch-constraint.txt" >&2
    echo "$want" >"$stamp"
}

PY="$ROOT/.venv/bin/python"   # the project's Python (WebUI pins); call ensure_venv before use

# run_pytest NAME VENV REQUIREMENTS [PYTEST ARGS]: prints a header, returns pytest's exit code.
run_pytest() {
    local name="$1" venv="$2" requirements="$3"
    shift 3
    ensure_venv "$venv" "$requirements"
    echo "=== tests: $name ($venv, $requirements) ==="
    local rc=0
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$venv/bin/python" -m pytest -q "$@" || rc=$?
    echo "=== $name: $([[ $rc -eq 0 ]] && echo passed || echo "FAILED (exit $rc)") ==="
    return "$rc"
}

compile_check_py310() {
    local python
    if ! python="$(find_python 10)"; then
        echo "=== Python 3.10 compile check: skipped (no Python 3.10 interpreter found) ==="
        return 0
    fi
    echo "=== Python 3.10 compile check ($python) ==="
    local rc=0
    local targets=(dreambooth_ext)
    [[ -d scripts ]] && targets+=(scripts)
    [[ -f install.py ]] && targets+=(install.py)
    # PYTHONPYCACHEPREFIX keeps the 3.10 bytecode out of the tree.
    local cache
    cache="$(mktemp -d)"
    PYTHONPYCACHEPREFIX="$cache" "$python" -m compileall -q "${targets[@]}" || rc=$?
    rm -rf "$cache"
    echo "=== Python 3.10 compile check: $([[ $rc -eq 0 ]] && echo passed || echo "FAILED (exit $rc)") ==="
    return "$rc"
}

cmd_test() {
    local failed=0
    compile_check_py310 || failed=1
    run_pytest "WebUI pins (A1111)" .venv requirements/webui.txt "$@" || failed=1
    run_pytest "Forge pins" .venv-forge requirements/forge.txt "$@" || failed=1
    if [[ $failed -ne 0 ]]; then
        echo "run.sh test: FAILED" >&2
        return 1
    fi
    echo "run.sh test: all passed"
}

command="${1:-}"
[[ $# -gt 0 ]] && shift

case "$command" in
    demo | convert | ui | bench | gpu-check | py) ensure_venv .venv requirements/webui.txt ;;
esac

case "$command" in
    demo) exec "$PY" -m dreambooth_ext demo "$@" ;;
    test) cmd_test "$@" ;;
    convert) exec "$PY" -m dreambooth_ext convert "$@" ;;
    ui) exec "$PY" -m dreambooth_ext ui "$@" ;;
    bench)
        if [[ $# -lt 1 ]]; then
            echo "usage: ./run.sh bench NAME [ARGS...]  (NAME is a file bench/NAME.py)" >&2
            exit 2
        fi
        name="$1"
        shift
        if [[ ! -f "bench/$name.py" ]]; then
            echo "run.sh: no benchmark bench/$name.py" >&2
            exit 2
        fi
        exec "$PY" "bench/$name.py" "$@"
        ;;
    gpu-check) exec "$PY" bench/gpu_check.py "$@" ;;
    py) exec "$PY" "$@" ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
