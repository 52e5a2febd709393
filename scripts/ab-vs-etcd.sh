#!/usr/bin/env bash
# Side by side in one run: etcd and one or more master builds on SQLite, in alternating rounds,
# driven by `ledger-bench against-load` (the closed loop of `--against etcd`: one connection,
# 1, 16 and 64 clients), with the server's and the load generator's CPU per write.
#
#   scripts/ab-vs-etcd.sh [--rounds N] [--seconds S] MASTER_BINARY [MASTER_BINARY...]
#
# For an A/B of a change: copy target/release/master aside before it, build, and pass both.
# Each round starts each server on a fresh directory under a temporary root. Needs `etcd` on PATH
# (scripts/install-etcd.sh) and a release build of ledger-bench.
set -euo pipefail

rounds=3
seconds=5
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $# -ge 1 ]] || { echo "usage: $0 [--rounds N] [--seconds S] MASTER_BINARY..." >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
bench=$here/target/release/ledger-bench
[[ -x $bench ]] || { echo "$bench is missing: cargo build --release -p ledger-bench" >&2; exit 1; }
command -v etcd > /dev/null || { echo "etcd is not on PATH: run scripts/install-etcd.sh" >&2; exit 1; }
for m in "$@"; do [[ -x $m ]] || { echo "$m is not an executable" >&2; exit 1; }; done

root=$(mktemp -d /tmp/ab-vs-etcd.XXXXXX)
server=
cleanup() {
    [[ -n $server ]] && kill "$server" 2> /dev/null && wait "$server" 2> /dev/null
    rm -rf "$root"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# measure NAME SYSTEM ADDR: one line per client count.
measure() {
    local name=$1 system=$2 addr=$3 clients before after rate gen
    for clients in 1 16 64; do
        before=$(ticks "$server")
        /usr/bin/time -f "%U %S" -o "$root/time" "$bench" against-load "$system" "$addr" "$clients" "$seconds" > "$root/out"
        after=$(ticks "$server")
        rate=$(awk '{print $2}' "$root/out")
        gen=$(awk '{print $1+$2}' "$root/time")
        awk -v n="$name" -v c="$clients" -v r="$rate" -v s="$seconds" -v t=$((after - before)) -v g="$gen" \
            'BEGIN { w = r * s; printf "%-28s %2d clients %7d writes/s  server %5.0f µs/write  generator %4.0f µs/write\n", n, c, r, t * 10000 / w, g * 1e6 / w }'
    done
}

for round in $(seq "$rounds"); do
    echo "[round $round]"
    dir=$root/etcd-$round
    mkdir -p "$dir"
    client=$(free_port)
    peer=$(free_port)
    etcd --name=ab --data-dir="$dir/data" --listen-client-urls="http://127.0.0.1:$client" \
        --advertise-client-urls="http://127.0.0.1:$client" --listen-peer-urls="http://127.0.0.1:$peer" \
        --initial-advertise-peer-urls="http://127.0.0.1:$peer" --initial-cluster="ab=http://127.0.0.1:$peer" \
        --logger=zap --log-level=warn > "$dir/log" 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$client/health" > /dev/null && break; sleep 0.1; done
    measure etcd etcd "127.0.0.1:$client"
    kill "$server"; wait "$server" 2> /dev/null || true; server=
    for i in $(seq $#); do
        master=${!i}
        dir=$root/master-$i-$round
        mkdir -p "$dir"
        port=$(free_port)
        "$master" --listen "127.0.0.1:$port" --bind --database-url "sqlite://$dir/ledger.db" > "$dir/log" 2>&1 &
        server=$!
        for _ in $(seq 100); do grep -q "listening on" "$dir/log" 2> /dev/null && break; sleep 0.1; done
        measure "$(basename "$master") ($i)" ledger "127.0.0.1:$port"
        kill "$server"; wait "$server" 2> /dev/null || true; server=
    done
done
