#!/bin/sh
# Instructions a packet of bench/relay-path.js (start-up excluded): two runs
# under callgrind, A and B packets after the same warm-up, and the difference.
# Usage: bench/relay-path-count.sh [relay|direct] [A] [B]
set -eu
mode=${1:-relay}
a=${2:-200000}
b=${3:-600000}
js=$(dirname "$0")/../dist/bench/relay-path.js
count() {
  valgrind --tool=callgrind --smc-check=all-non-file --callgrind-out-file=/dev/null \
    node --single-threaded "$js" --mode "$mode" --packets "$1" --warmup 200000 2>&1 >/dev/null |
    sed -n 's/.*Collected : *//p'
}
ia=$(count "$a")
ib=$(count "$b")
echo "$mode: $(( (ib - ia) / (b - a) )) instructions a packet ($a: $ia, $b: $ib)"
