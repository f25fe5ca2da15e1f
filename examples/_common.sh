# Sourced by every example (not run on its own): the dependency check and the work folder.
#
#   . "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
#   need ddguide python3        # one readable line and exit 2 when a command is missing
#   start_work attributes       # cd into $WORK (default ./runs/example-attributes), which must be new or empty

need() {
    local cmd
    for cmd in "$@"; do
        if ! command -v "$cmd" >/dev/null 2>&1; then
            echo "$(basename "$0"): '$cmd' not found on PATH; install ddguide (./install.sh) and activate its environment (. .venv/bin/activate)" >&2
            exit 2
        fi
    done
}

start_work() {
    WORK=${WORK:-./runs/example-$1}
    if [ -e "$WORK" ] && { [ ! -d "$WORK" ] || [ -n "$(ls -A "$WORK")" ]; }; then
        echo "$(basename "$0"): $WORK exists and is not an empty folder; remove it or set WORK=<new folder>" >&2
        exit 2
    fi
    mkdir -p "$WORK"
    cd "$WORK"
    echo "$(basename "$0"): working in $PWD" >&2
}
