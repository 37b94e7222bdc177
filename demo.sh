#!/bin/bash
# The quick start: install what is missing, start a private D-Bus bus with
# stillsvc and its simulated scanner on it, and show how to talk to it.
#
#   bash demo.sh         set up, start, show
#   bash demo.sh stop    stop the demo service and its bus
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
state="${XDG_RUNTIME_DIR:-/tmp}/stillsvc-demo-$(id -u)"

stop() {
    if [ -f "$state/pids" ]; then
        kill $(cat "$state/pids") 2>/dev/null || true
        rm -f "$state/pids"
        echo "stopped the demo service and its bus"
    fi
}

if [ "${1:-}" = stop ]; then
    stop
    exit 0
fi

# An earlier run may have installed into .venv (where python3 is Debian's own).
if [ -x .venv/bin/python3 ]; then
    export VIRTUAL_ENV="$PWD/.venv"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
fi

# Everything this script and the tests run. The imports are tried from outside
# the source tree, where only an installed stillsvc (with its dependencies) is found.
installed() {
    local cmd
    for cmd in dbus-daemon busctl flock stillsvc stillctl; do
        command -v "$cmd" >/dev/null || return 1
    done
    (cd / && python3 -c 'import stillsvc.daemon, stillsvc.ctl, pytest, pytest_asyncio, hypothesis, pypdf, dbusmock') \
        >/dev/null 2>&1
}

if ! installed; then
    echo "== installing (Debian packages and the project) =="
    source .ci/install.sh
fi
stop
mkdir -p "$state"

echo "== starting a private bus and the service with the simulated scanner =="
read -r address bus_pid < <(dbus-daemon --session --fork --print-address=1 --print-pid=1 | paste -sd' ')
stillsvc --bus "$address" --simulate --no-sane --runtime-dir "$state/run" --state-dir "$state/state" \
    --log-format plain >"$state/stillsvc.log" 2>&1 &
echo "$bus_pid $!" >"$state/pids"
export STILLSVC_BUS="$address"
for _ in $(seq 100); do
    stillctl list >/dev/null 2>&1 && break
    sleep 0.1
done

run() { echo; echo "\$ $*"; "$@"; }
run stillctl list
run stillctl info sim0
run stillctl items sim0
run stillctl scan sim0 -o "$state/page.png" --resolution 75
run busctl --address="$address" introspect org.stillsvc.StillImage1 /org/stillsvc/StillImage1/devices/sim0 \
    org.stillsvc.StillImage1.Device
echo; echo "\$ stillctl info nope    # a wrong input gets a clear error"
stillctl info nope || true

cat <<TXT

The service is running (log: $state/stillsvc.log). In this shell:

  export STILLSVC_BUS='$address'
  stillctl monitor                                   # watch devices and events (Ctrl-C to stop)
  busctl --address="\$STILLSVC_BUS" call org.stillsvc.StillImage1 /org/stillsvc/StillImage1/devices/sim0 \\
      org.stillsvc.StillImage1.Simulator PressButton s scan
  stillctl scan sim0 -o page.pdf --resolution 150 --mode gray
  stillctl lock sim0 -- sh -c 'echo "the device is mine"; sleep 2'

Stop it with: bash demo.sh stop
Run the tests with: python3 -m pytest -q
TXT
