# Sourced by .ci/run and demo.sh: install what the service and its tests need
# on a Debian 12 machine (with python3 on PATH and apt), then the project
# itself with its test extras. Leaves a virtual environment active if one was
# needed (see below).

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi

packages=(dbus dbus-daemon dbus-bin libusb-1.0-0 umockdev util-linux systemd sane-utils libsane1 sane-airscan iproute2 openssl chromium
          qemu-system-x86 linux-image-amd64 busybox-static
          libdbus-1-dev libglib2.0-dev pkg-config gcc make)

# Install into the python3 on PATH when it has pip and may be installed into
# (pyenv's, or an active virtual environment). Debian's own python3 has no pip
# and is marked EXTERNALLY-MANAGED (PEP 668): then use a virtual environment,
# which on Debian needs python3-venv.
use_venv=no
if ! python3 -m pip --version >/dev/null 2>&1 || python3 -c '
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(marker) else 1)
'; then
    use_venv=yes
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        packages+=(python3-venv)
    fi
fi

"${as_root[@]}" apt-get -o Acquire::Retries=3 update
"${as_root[@]}" apt-get -o Acquire::Retries=3 install -y --no-install-recommends "${packages[@]}"

if [ "$use_venv" = yes ]; then
    python3 -m venv .venv
    export VIRTUAL_ENV="$PWD/.venv"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
fi

python3 --version
python3 -m pip install -e '.[test]'

