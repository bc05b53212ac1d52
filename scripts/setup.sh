#!/usr/bin/env bash
# Set up maepipe in ./.venv: torch pinned to 2.13.0 first (so nothing drags in another build), then the
# package and its extras. With --test, also the system pieces the integration tests start for real
# (Slurm + munge). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_install() {
    # Only where apt exists and we may use it (root, or passwordless sudo); otherwise say what is missing.
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
    if command -v apt-get >/dev/null && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
        echo "setup: installing ${missing[*]} with apt-get"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: please install these system packages first: ${missing[*]}" >&2
        return 1
    fi
}

PYTHON=${PYTHON:-python3}
if command -v dpkg >/dev/null; then
    apt_install dataset-fashion-mnist
    "$PYTHON" -c "import venv, ensurepip" 2>/dev/null || apt_install python3-venv
    if [ $want_test -eq 1 ]; then apt_install slurmctld slurmd slurm-client munge; fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.maepipe-setup-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$want_test"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==2.13.0"
    extras=""
    [ $want_test -eq 1 ] && extras="[test]"
    # DeepSpeed as pure Python: its C++ ops would compile for minutes and are not used on CPU
    DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c constraints.txt -e ".$extras"
    if [ $want_test -eq 1 ]; then
        # timm checks our export (strict load); with its deps, torchvision would pull another torch build.
        # The export test registers the two torchvision operators a CPU torch lacks before importing timm.
        .venv/bin/python -m pip install -q --no-deps timm==1.0.31 torchvision==0.29.1
    fi
    rm -f .venv/.maepipe-setup-*
    touch "$stamp"
fi
echo "setup: ready (.venv/bin/maepipe)"
