#!/usr/bin/env bash
# Machine set-up for virtio-bridge: the Debian packages the real-peer tests and
# benchmarks need, and hugepages for DPDK. Idempotent and fast when everything is
# already there (no apt-get update unless a package is missing). Run as root.
#
# Environment:
#   VBRIDGE_HUGEPAGES   wanted number of 2 MiB hugepages (default 1024)
#   VBRIDGE_SKIP_HUGEPAGES=1  leave hugepages alone
set -euo pipefail

PACKAGES=(
  gcc               # the addon, native/vbglue.c
  g++               # the addon's one V8 call, native/unaccounted-buffer.cc
  qemu-system-x86   # qemu-system-x86_64 (guests under TCG)
  qemu-utils        # qemu-img
  busybox-static    # the guest initramfs userland
  chromium          # the dashboard test's browser (headless, driven by puppeteer-core, which downloads none)
  cpio              # initramfs archives
  dpdk              # DPDK runtime
  dpdk-dev          # dpdk-testpmd and friends
  e2fsprogs         # mkfs.ext2 for guest disk images
  fio               # block benchmarks
  iproute2          # ip, TAP devices
  libvirt-clients   # virt-xml-validate: the XML of vbridge qemu-args --libvirt checked offline
  libxml2-utils     # xmllint, which virt-xml-validate runs
  prometheus        # promtool: the tests check /metrics with `promtool check metrics`
  tcpdump           # reads back what vbridge capture writes
)
WANT_HUGEPAGES="${VBRIDGE_HUGEPAGES:-1024}"
HUGE_MNT=/dev/hugepages

log() { printf 'setup: %s\n' "$*" >&2; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# --- packages -------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  # dpkg -s exits 0 for packages that are known but not installed (e.g.
  # "deinstall ok config-files"), so look at the status line itself.
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  if ! is_root; then
    log "missing packages: ${missing[*]} (run this script as root to install them)"
    exit 1
  fi
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "packages: all present"
fi

# --- hugepages for DPDK ---------------------------------------------------
if [ "${VBRIDGE_SKIP_HUGEPAGES:-0}" = "1" ]; then
  log "hugepages: skipped (VBRIDGE_SKIP_HUGEPAGES=1)"
  exit 0
fi

nr_file=/proc/sys/vm/nr_hugepages
have=$(cat "$nr_file" 2>/dev/null || echo 0)
if [ "$have" -lt "$WANT_HUGEPAGES" ]; then
  if is_root && [ -w "$nr_file" ]; then
    echo "$WANT_HUGEPAGES" > "$nr_file" || true
    have=$(cat "$nr_file")
    if [ "$have" -lt "$WANT_HUGEPAGES" ]; then
      # Memory may be fragmented: compact and try once more.
      echo 1 > /proc/sys/vm/compact_memory 2>/dev/null || true
      echo "$WANT_HUGEPAGES" > "$nr_file" || true
      have=$(cat "$nr_file")
    fi
  fi
fi
if [ "$have" -lt "$WANT_HUGEPAGES" ]; then
  # Not fatal: everything but the DPDK tests and benches works without them,
  # and those check for themselves.
  log "WARNING: only $have hugepages (wanted $WANT_HUGEPAGES); DPDK runs may fail"
else
  log "hugepages: $have"
fi

if ! grep -qs " $HUGE_MNT hugetlbfs " /proc/mounts; then
  if is_root; then
    mkdir -p "$HUGE_MNT"
    if mount -t hugetlbfs -o pagesize=2M nodev "$HUGE_MNT"; then
      log "mounted hugetlbfs at $HUGE_MNT"
    else
      log "WARNING: could not mount hugetlbfs at $HUGE_MNT; DPDK runs may fail"
    fi
  else
    log "WARNING: hugetlbfs not mounted at $HUGE_MNT (needs root)"
  fi
else
  log "hugetlbfs: mounted at $HUGE_MNT"
fi
