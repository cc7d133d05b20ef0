#!/usr/bin/env bash
# Builds the test guest used by the end-to-end tests, `make demo` and `make bench`:
#
#   .cache/guest/vmlinuz             Debian's cloud kernel (linux-image-cloud-amd64)
#   .cache/guest/initramfs.cpio.gz   busybox-static + the virtio modules + /init
#   .cache/guest/modules.txt         the modules /init loads, in order
#   .cache/guest/kernel-version      e.g. 6.1.0-56-cloud-amd64
#
# /init mounts proc/sys/dev, insmods the modules, brings up lo, runs /test.sh
# (the harness appends it as a second cpio archive per run), prints
# `VBRIDGE-DONE rc=<exit code>` on the console and powers off.
#
# Cached and reproducible: the kernel .deb is downloaded once into .cache/, and
# the guest is rebuilt only when an input changes (the .deb, busybox, this
# script). The archive has fixed owners, modes and mtimes, and sorted entries.
#
# Environment:
#   VBRIDGE_CACHE        cache directory (default: <repo>/.cache)
#   VBRIDGE_KERNEL_DEB   use this linux-image-*.deb instead of resolving one
#   VBRIDGE_DEB_CACHE    extra per-machine cache of the .deb, shared by clones
#                        (default: ${XDG_CACHE_HOME:-$HOME/.cache}/vbridge)
#   FORCE=1              rebuild even if up to date
set -euo pipefail
umask 022
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/build-guest.sh"
CACHE="${VBRIDGE_CACHE:-$ROOT/.cache}"
OUT="$CACHE/guest"
DEB_CACHE="${VBRIDGE_DEB_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/vbridge}"
META_PKG=linux-image-cloud-amd64
BUSYBOX=/bin/busybox

# Loaded in this order (dependencies found with modinfo are put before their users).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         failover net_failover virtio_net virtio_blk)

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$CACHE" "$OUT"

# One build at a time (parallel make targets, several test processes).
exec 9>"$CACHE/.build-guest.lock"
flock 9

# --- 1. the kernel package --------------------------------------------------
resolve_pkg() {
  # linux-image-cloud-amd64 depends on exactly one versioned image package.
  apt-cache depends "$META_PKG" 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }'
}

candidate_version() {
  apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }'
}

find_deb() { # dir pkg version -> path of a matching .deb, if any
  local f
  f="$1/${2}_${3//:/%3a}_amd64.deb"
  [ -f "$f" ] && printf '%s\n' "$f"
  return 0
}

newest_cached_deb() {
  ls "$CACHE"/linux-image-*-cloud-amd64_*_amd64.deb 2>/dev/null | sort -V | tail -n 1
}

get_deb() {
  if [ -n "${VBRIDGE_KERNEL_DEB:-}" ]; then
    [ -f "$VBRIDGE_KERNEL_DEB" ] || die "VBRIDGE_KERNEL_DEB=$VBRIDGE_KERNEL_DEB not found"
    printf '%s\n' "$VBRIDGE_KERNEL_DEB"
    return
  fi
  local pkg ver deb src
  pkg=$(resolve_pkg || true)
  if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
    log "apt lists do not know $META_PKG; running apt-get update"
    apt-get update -qq >&2 || true
    pkg=$(resolve_pkg || true)
  fi
  if [ -z "$pkg" ]; then
    deb=$(newest_cached_deb)
    [ -n "$deb" ] || die "cannot resolve $META_PKG (no apt lists?) and no kernel .deb in $CACHE"
    log "cannot resolve $META_PKG; using cached $(basename "$deb")"
    printf '%s\n' "$deb"
    return
  fi
  ver=$(candidate_version "$pkg")
  [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no candidate version for $pkg"
  deb=$(find_deb "$CACHE" "$pkg" "$ver")
  if [ -n "$deb" ]; then printf '%s\n' "$deb"; return; fi

  # Not in .cache: a copy this machine already has (another clone, apt's own cache)?
  for d in "$DEB_CACHE" /var/cache/apt/archives; do
    src=$(find_deb "$d" "$pkg" "$ver")
    if [ -n "$src" ]; then
      log "using $src"
      cp "$src" "$CACHE/.deb.tmp" && mv "$CACHE/.deb.tmp" "$CACHE/$(basename "$src")"
      break
    fi
  done
  deb=$(find_deb "$CACHE" "$pkg" "$ver")
  if [ -z "$deb" ]; then
    log "downloading $pkg=$ver"
    local dl
    dl=$(mktemp -d "$CACHE/.download.XXXXXX")
    # (as root, apt would drop to _apt, which cannot write under the work tree)
    (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >&2) || { rm -rf "$dl"; die "apt-get download $pkg=$ver failed"; }
    src=$(find_deb "$dl" "$pkg" "$ver")
    [ -n "$src" ] || { rm -rf "$dl"; die "apt-get download produced no .deb for $pkg=$ver"; }
    mv "$src" "$CACHE/"
    rm -rf "$dl"
    deb=$(find_deb "$CACHE" "$pkg" "$ver")
    if mkdir -p "$DEB_CACHE" 2>/dev/null; then
      cp "$deb" "$DEB_CACHE/.deb.tmp" 2>/dev/null && mv "$DEB_CACHE/.deb.tmp" "$DEB_CACHE/$(basename "$deb")" || true
    fi
  fi
  # Keep only the current kernel .deb in .cache.
  for old in "$CACHE"/linux-image-*-cloud-amd64_*_amd64.deb; do
    [ "$old" = "$deb" ] || rm -f "$old"
  done
  printf '%s\n' "$deb"
}

DEB=$(get_deb)
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
if ! dpkg-query -S "$BUSYBOX" 2>/dev/null | grep -q '^busybox-static:'; then
  die "$BUSYBOX is not from busybox-static (the guest needs the static build)"
fi

# --- 2. up to date? ---------------------------------------------------------
INPUT_KEY=$( {
  printf 'deb %s %s\n' "$(basename "$DEB")" "$(stat -c %s "$DEB")"
  printf 'busybox %s\n' "$(sha256sum < "$BUSYBOX" | cut -d' ' -f1)"
  printf 'script %s\n' "$(sha256sum < "$SELF" | cut -d' ' -f1)"
} | sha256sum | cut -d' ' -f1)

if [ "${FORCE:-0}" != "1" ] && [ -f "$OUT/inputs.sha256" ] \
   && [ "$(cat "$OUT/inputs.sha256")" = "$INPUT_KEY" ] \
   && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
  log "up to date ($(cat "$OUT/kernel-version"))"
  exit 0
fi

# --- 3. extract the kernel and the modules ---------------------------------
WORK=$(mktemp -d "$CACHE/.guest-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "extracting $(basename "$DEB")"
dpkg-deb -x "$DEB" "$WORK/pkg"

VMLINUZ=$(ls "$WORK"/pkg/boot/vmlinuz-* 2>/dev/null | head -n 1)
[ -n "$VMLINUZ" ] || die "no /boot/vmlinuz-* in $(basename "$DEB")"
KVER=${VMLINUZ##*/vmlinuz-}
KCONFIG="$WORK/pkg/boot/config-$KVER"
MODDIR="$WORK/pkg/lib/modules/$KVER"
[ -f "$KCONFIG" ] || die "no /boot/config-$KVER in the package"
[ -d "$MODDIR" ] || die "no /lib/modules/$KVER in the package"

config_val() { # CONFIG_FOO -> y, m or empty
  sed -n "s/^$1=\\(.*\\)\$/\\1/p" "$KCONFIG" | head -n 1
}

# ext2 support: built in (CONFIG_EXT2_FS=y, or ext4 built in and used for ext2),
# or a module to load.
case "$(config_val CONFIG_EXT2_FS)/$(config_val CONFIG_EXT4_FS)/$(config_val CONFIG_EXT4_USE_FOR_EXT2)" in
  y/*|*/y/y) log "ext2: built in" ;;
  m/*)       log "ext2: module ext2"; MODULES+=(ext2) ;;
  */m/y)     log "ext2: module ext4"; MODULES+=(ext4) ;;
  *)         die "the kernel cannot mount ext2 (CONFIG_EXT2_FS/CONFIG_EXT4_FS)" ;;
esac

find_module() { # name -> path of its .ko[.xz|.zst|.gz] (names may use - or _)
  local pat
  pat=$(printf '%s' "$1" | sed 's/[-_]/[-_]/g')
  find "$MODDIR/kernel" \( -name "$pat.ko" -o -name "$pat.ko.xz" -o -name "$pat.ko.zst" -o -name "$pat.ko.gz" \) \
    | sort | head -n 1
}

is_builtin() { # name -> true when it is built into the kernel
  local pat
  pat=$(printf '%s' "$1" | sed 's/[-_]/[-_]/g')
  [ -f "$MODDIR/modules.builtin" ] && grep -Eq "/$pat\\.ko\$" "$MODDIR/modules.builtin"
}

ko_cat() { # path -> the uncompressed module on stdout
  case "$1" in
    *.ko.xz)  xz -dc "$1" ;;
    *.ko.zst) zstd -qdc "$1" ;;
    *.ko.gz)  gzip -dc "$1" ;;
    *)        cat "$1" ;;
  esac
}

modinfo_field() { # field path -> value (comma or space separated)
  # kmod's modinfo when the machine has it; else read the .modinfo strings.
  if modinfo --version 2>/dev/null | grep -q kmod; then
    modinfo -F "$1" "$2" 2>/dev/null || true
  else
    ko_cat "$2" | tr '\0' '\n' | sed -n "s/^$1=//p"
  fi
}

ORDER=()
declare -A SEEN=()
add_module() { # name [soft]
  local name=${1//-/_} soft=${2:-} path dep deps pre
  [ -n "${SEEN[$name]:-}" ] && return 0
  SEEN[$name]=1
  path=$(find_module "$name")
  if [ -z "$path" ]; then
    if is_builtin "$name"; then return 0; fi
    # softdeps name algorithms (crc32c) whose module is crc32c_generic
    if [ -n "$soft" ]; then
      path=$(find_module "${name}_generic")
      [ -n "$path" ] || { log "note: soft dependency $name not found, skipped"; return 0; }
      name=${name}_generic
      SEEN[$name]=1
    else
      die "module $name is neither in the package nor built in"
    fi
  fi
  deps=$(modinfo_field depends "$path" | tr ',' ' ')
  for dep in $deps; do add_module "$dep"; done
  # softdep "pre: a b post: c": load the pre ones first
  pre=$(modinfo_field softdep "$path" | sed -n 's/.*pre:\([^:]*\)\( post:.*\)\{0,1\}$/\1/p' | sed 's/post:.*//')
  for dep in $pre; do add_module "$dep" soft; done
  ORDER+=("$name")
  MODPATH[$name]=$path
}
declare -A MODPATH=()
for m in "${MODULES[@]}"; do add_module "$m"; done

# --- 4. the initramfs tree ----------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,root,mnt,var/log,lib/modules}
chmod 1777 "$R/tmp"
install -m 0755 "$BUSYBOX" "$R/bin/busybox"
"$BUSYBOX" --list-full | sort | while read -r applet; do
  case "$applet" in ''|linuxrc|bin/busybox) continue ;; esac
  mkdir -p "$R/$(dirname "$applet")"
  [ -e "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done

: > "$R/etc/modules.order"
for m in "${ORDER[@]}"; do
  ko_cat "${MODPATH[$m]}" > "$R/lib/modules/$m.ko"
  chmod 0644 "$R/lib/modules/$m.ko"
  printf '%s\n' "$m" >> "$R/etc/modules.order"
done
log "kernel $KVER, modules: ${ORDER[*]}"

printf 'root:x:0:0:root:/root:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\n' > "$R/etc/group"
printf 'vbridge-guest\n' > "$R/etc/hostname"
printf '%s\n' "$KVER" > "$R/etc/kernel-version"
# The kernel's own initramfs has /dev/console already; this one is for safety.
if [ "$(id -u)" -eq 0 ]; then mknod -m 0600 "$R/dev/console" c 5 1; fi

cat > "$R/init" <<'EOF'
#!/bin/sh
# virtio-bridge test guest (scripts/build-guest.sh). Runs /test.sh, prints
# "VBRIDGE-DONE rc=<exit code>" and powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1
hostname -F /etc/hostname
while read -r m; do
  insmod "/lib/modules/$m.ko" || echo "VBRIDGE-INSMOD-FAILED $m"
done < /etc/modules.order
ip link set lo up
echo "VBRIDGE-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /
if [ -f /test.sh ]; then
  sh /test.sh
  rc=$?
else
  echo "VBRIDGE: no /test.sh in the initramfs"
  rc=127
fi
sync
echo
echo "VBRIDGE-DONE rc=$rc"
poweroff -f
EOF
chmod 0755 "$R/init"

# --- 5. reproducible archive ------------------------------------------------
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
  | gzip -9 -n > "$WORK/initramfs.cpio.gz"

cp "$VMLINUZ" "$WORK/vmlinuz"
printf '%s\n' "${ORDER[@]}" > "$WORK/modules.txt"
printf '%s\n' "$KVER" > "$WORK/kernel-version"
rm -f "$OUT/inputs.sha256"
for f in vmlinuz initramfs.cpio.gz modules.txt kernel-version; do
  chmod 0644 "$WORK/$f"
  mv -f "$WORK/$f" "$OUT/$f"
done
printf '%s\n' "$INPUT_KEY" > "$OUT/inputs.sha256"
log "built $OUT (initramfs $(stat -c %s "$OUT/initramfs.cpio.gz") bytes, sha256 $(sha256sum < "$OUT/initramfs.cpio.gz" | cut -c1-16))"
