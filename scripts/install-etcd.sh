#!/usr/bin/env bash
# Makes sure an `etcd` server binary is on PATH, for `ledger-bench --against etcd`.
#
# As scripts/test.sh does for PostgreSQL: when `etcd` is missing and we are root with apt-get,
# it installs Debian's etcd-server package (etcd 3.4 on bookworm); otherwise it stops and says
# what is missing. The benchmark never skips etcd, so this fails rather than go on without it.
set -euo pipefail

if command -v etcd >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install-etcd.sh: installing the etcd server (apt-get install etcd-server)" >&2
    apt-get update -qq
    # --no-install-recommends: the server binary only; the package's own service is not needed
    # (the benchmark starts its etcd itself, on ephemeral ports, in a temporary directory).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
fi
command -v etcd >/dev/null || {
    echo "install-etcd.sh: no etcd on PATH: install etcd-server (apt-get install etcd-server, as root) or put an etcd 3.4+ binary on PATH" >&2
    exit 1
}
