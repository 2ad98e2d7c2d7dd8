#!/usr/bin/env bash
# A Raspberry Pi-class device on this machine: a 64-bit Debian (arm64) userland run under QEMU
# user-mode emulation, with the CPU model chosen, sharing this machine's loopback network.
#
#   clients/pi/emulate.sh build                    # once (cached in $FEDRNN_PI_ROOT): debootstrap + Pi guide install
#   clients/pi/emulate.sh install                  # reinstall this checkout's lean extra (after code changes)
#   clients/pi/emulate.sh exec [--cpu M] CMD ...   # run CMD in the userland (venv on PATH, cwd the repo copy)
#   clients/pi/emulate.sh supernode [--cpu M] [flower-supernode args]
#                                                  # clients/run_supernode.sh in the userland, as on a Pi
#   clients/pi/emulate.sh check                    # exit 0 when emulation and the userland are ready
#
# --cpu (or QEMU_CPU): cortex-a53 (Pi 3, Zero 2 W: ARMv8.0), cortex-a72 (Pi 4: ARMv8.0),
# cortex-a76 (Pi 5: ARMv8.2); default cortex-a72. QEMU faults (SIGILL) on any instruction the
# model lacks, which is how a wheel built for a newer core fails on a real board.
#
# Settings (environment):
#   FEDRNN_PI_ROOT   /work/pi-rootfs/bookworm   the userland (outside the repository; ~1.5 GB)
#   FEDRNN_PI_TORCH  2.9.1                      the torch wheel the guide installs (clients/README.md)
#   FEDRNN_PI_TORCH_DIR  (unset)                a userland directory with another torch, put first on
#                                               PYTHONPATH (e.g. /opt/torch-2.9.1, unpacked by compat.py --alt-torch)
# `supernode` stretches Flower's 30 s ClientApp start window for QEMU's speed
# (clients/pi/emulation_site/sitecustomize.py, FEDRNN_PI_HEARTBEAT_S); it passes SUPERLINK, CA, KEY, NODE_CONFIG, RUNTIME_PORT, FEDRNN_*, FLWR_* and
# OMP_NUM_THREADS through: paths in them are paths *inside* the userland (a host path P under
# $FEDRNN_PI_ROOT is P without that prefix). Every command runs in a private mount namespace
# (proc and dev are mounted there and vanish with it), with a clean environment. No sysfs: the
# host's (x86) CPU topology there makes onnxruntime's cpuinfo crash (SIGSEGV) under emulation.
# Needs root, qemu-user-static, debootstrap and binfmt-support (apt-get install -y ...).
set -euo pipefail

ROOT=${FEDRNN_PI_ROOT:-/work/pi-rootfs/bookworm}
TORCH=${FEDRNN_PI_TORCH:-2.9.1}
SUITE=bookworm  # Python 3.11, as Raspberry Pi OS Bookworm
MIRROR=${FEDRNN_PI_MIRROR:-http://deb.debian.org/debian}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PI_HOME=/home/pi  # the guide's paths: ~/fedrnn (the code), ~/fedrnn-venv
CPU=${QEMU_CPU:-cortex-a72}

die() { echo "emulate.sh: $*" >&2; exit 2; }

binfmt() {
    # The kernel must hand aarch64 ELF files to QEMU; the F flag keeps the interpreter usable in a chroot.
    command -v qemu-aarch64-static >/dev/null || die "qemu-aarch64-static missing: apt-get install -y qemu-user-static binfmt-support"
    if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
        mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
    fi
    if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
        update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 with binfmt_misc"
    fi
    grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "qemu-aarch64 binfmt entry lacks the F flag"
}

# in_root CMD...: run CMD inside the userland with a clean environment (plus $PASS variables).
in_root() {
    local env=(HOME="$PI_HOME" LANG=C.UTF-8 QEMU_CPU="$CPU" PIP_CERT=/etc/ssl/certs/ca-certificates.crt
               PATH="$PI_HOME/fedrnn-venv/bin:/usr/local/bin:/usr/bin:/bin" PIP_DISABLE_PIP_VERSION_CHECK=1)
    local pythonpath=${FEDRNN_PI_TORCH_DIR:-}
    if [[ -n ${EMULATION_SITE:-} ]]; then  # supernode: Flower's heartbeat window stretched for QEMU's speed
        pythonpath=$EMULATION_SITE${pythonpath:+:$pythonpath}
    fi
    [[ -n $pythonpath ]] && env+=(PYTHONPATH="$pythonpath")
    local v
    for v in $(compgen -e); do
        [[ $v =~ ^(SUPERLINK|CA|KEY|NODE_CONFIG|RUNTIME_PORT|FEDRNN_.*|FLWR_.*|OMP_NUM_THREADS)$ ]] && env+=("$v=${!v}")
    done
    exec unshare --mount --propagation private -- bash -c '
        set -e; root=$1; shift
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        exec chroot "$root" /usr/bin/env -i "$@"' _ "$ROOT" "${env[@]}" "$@"
}

ready() { [[ -x $ROOT$PI_HOME/fedrnn-venv/bin/flower-supernode && -f $ROOT/.fedrnn-installed ]]; }

build_userland() {
    if [[ ! -x $ROOT/usr/bin/python3 ]]; then
        command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install -y debootstrap"
        mkdir -p "$(dirname "$ROOT")"
        debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            "$SUITE" "$ROOT" "$MIRROR"
    fi
    # pip inside reaches the package registry with the host's resolver and CA bundle
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$ROOT$PI_HOME"
}

copy_repo() {
    # The guide's `git clone`: this checkout's tracked and untracked-but-not-ignored files.
    rm -rf "$ROOT$PI_HOME/fedrnn"
    mkdir -p "$ROOT$PI_HOME/fedrnn"
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} find {} -maxdepth 0 -type f -print0 \
        | tar --null -T - -cf -) | tar -xf - -C "$ROOT$PI_HOME/fedrnn"
}

install_device() {
    # Exactly the steps of clients/README.md, sections 1 and 2.
    copy_repo
    rm -f "$ROOT/.fedrnn-installed"
    (in_root bash -ec "
        cd $PI_HOME/fedrnn
        [ -x $PI_HOME/fedrnn-venv/bin/python ] || python3 -m venv $PI_HOME/fedrnn-venv
        . $PI_HOME/fedrnn-venv/bin/activate
        pip install --upgrade pip
        pip install torch==$TORCH
        pip install '.[device]'
        python -c 'import torch, flwr, onnxruntime; print(torch.__version__, torch.cuda.is_available(), flwr.__version__)'
    ")
    date -u +%FT%TZ > "$ROOT/.fedrnn-installed"
}

cmd=${1:-}
[[ -n $cmd ]] || die "usage: emulate.sh build|install|exec|supernode|check ..."
shift
if [[ ${1:-} == --cpu ]]; then
    CPU=${2:?--cpu needs a model}; shift 2
fi
[[ $CPU =~ ^(cortex-a53|cortex-a72|cortex-a76|cortex-a57|cortex-a35|neoverse-n1|max)$ ]] || die "unknown CPU model $CPU"
[[ $(id -u) == 0 ]] || die "needs root (chroot, mounts, binfmt_misc)"

case $cmd in
    check)
        binfmt
        ready || die "no userland at $ROOT (run: clients/pi/emulate.sh build)" ;;
    build)
        binfmt
        build_userland
        install_device ;;
    install)
        binfmt
        [[ -x $ROOT/usr/bin/python3 ]] || die "no userland at $ROOT (run: clients/pi/emulate.sh build)"
        install_device ;;
    exec)
        binfmt
        ready || die "no userland at $ROOT (run: clients/pi/emulate.sh build)"
        in_root bash -c 'cd "$0" && exec "$@"' "$PI_HOME/fedrnn" "$@" ;;
    supernode)
        binfmt
        ready || die "no userland at $ROOT (run: clients/pi/emulate.sh build)"
        # emulation only (see the file's docstring): a Pi runs Python 10-50x faster than QEMU does
        mkdir -p "$ROOT/opt/fedrnn-emulation"
        cp "$REPO/clients/pi/emulation_site/sitecustomize.py" "$ROOT/opt/fedrnn-emulation/"
        EMULATION_SITE=/opt/fedrnn-emulation
        in_root bash -c 'cd "$0" && exec clients/run_supernode.sh "$@"' "$PI_HOME/fedrnn" "$@" ;;
    *)
        die "unknown command $cmd (build|install|exec|supernode|check)" ;;
esac
