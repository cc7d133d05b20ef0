#!/bin/sh
# Builds the Node-API addon build/vbglue.node from native/vbglue.c (and the
# one V8 call in native/unaccounted-buffer.cc) with the machine's compilers
# against the headers of Debian's nodejs package (/usr/include/node, which
# also has uv.h and v8.h). No node-gyp, no downloads.
# Does nothing when the .node is newer than its sources.
set -eu
cd "$(dirname "$0")/.."
c_src=native/vbglue.c
cc_src=native/unaccounted-buffer.cc
out=build/vbglue.node
if [ -f "$out" ] && [ "$out" -nt "$c_src" ] && [ "$out" -nt "$cc_src" ]; then
  exit 0
fi
if [ ! -f /usr/include/node/node_api.h ]; then
  echo "build-addon: /usr/include/node/node_api.h missing (apt-get install nodejs)" >&2
  exit 1
fi
# V8's C++ API, unlike Node-API, holds only for the V8 it was compiled
# against: the headers must be the running node's own.
headers=$(awk '/define NODE_(MAJOR|MINOR|PATCH)_VERSION/ { v = v (v ? "." : "") $3 } END { print "v" v }' /usr/include/node/node_version.h)
running=$(node -p process.version)
if [ "$headers" != "$running" ]; then
  echo "build-addon: /usr/include/node is $headers but node is $running: install the headers of the node that runs vbridge" >&2
  exit 1
fi
mkdir -p build
tmp="build/.vbglue.$$"
trap 'rm -f "$tmp".o "$tmp".cc.o "$tmp".node' EXIT
gcc -O2 -Wall -Wextra -Werror -fPIC -I/usr/include/node -c -o "$tmp.o" "$c_src"
# -isystem: V8's headers do not build under our -Wextra -Werror.
g++ -O2 -std=c++17 -Wall -Wextra -Werror -fPIC -isystem /usr/include/node -c -o "$tmp.cc.o" "$cc_src"
# Link to a temporary name and rename: a half-written .node must never look
# newer than the sources, and a process loading it never sees a partial file.
g++ -shared -o "$tmp.node" "$tmp.o" "$tmp.cc.o"
mv -f "$tmp.node" "$out"
