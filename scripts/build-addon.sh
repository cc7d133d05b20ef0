#!/bin/sh
# Builds the Node-API addon build/vbglue.node from native/vbglue.c with the
# machine's C compiler against the headers of Debian's nodejs package
# (/usr/include/node, which also has uv.h). No node-gyp, no downloads.
# Does nothing when the .node is newer than the .c.
set -eu
cd "$(dirname "$0")/.."
src=native/vbglue.c
out=build/vbglue.node
if [ -f "$out" ] && [ "$out" -nt "$src" ]; then
  exit 0
fi
if [ ! -f /usr/include/node/node_api.h ]; then
  echo "build-addon: /usr/include/node/node_api.h missing (apt-get install nodejs)" >&2
  exit 1
fi
mkdir -p build
# Build to a temporary name and rename: a half-written .node must never look
# newer than the source, and a process loading it never sees a partial file.
gcc -O2 -Wall -Wextra -Werror -shared -fPIC -I/usr/include/node -o "$out.tmp.$$" "$src"
mv -f "$out.tmp.$$" "$out"
