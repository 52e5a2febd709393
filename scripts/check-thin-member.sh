#!/usr/bin/env bash
# The member is a thin client (README): it depends on no database and no server code, and its
# release binary links the C runtime only and stays under 8 MiB.
#
#   scripts/check-thin-member.sh            the dependency check (cargo tree; no build)
#   scripts/check-thin-member.sh --release  also builds the release member and checks ldd and size
set -euo pipefail
cd "$(dirname "$0")/.."

# Crates that would put a database, or the master's serving code, into the member.
forbidden='^(diesel|diesel_migrations|pq-sys|libsqlite3-sys|tokio-postgres|postgres-protocol|r2d2|ledger-server|ledger-storage|ledger-master) '
tree=$(cargo tree -p ledger-member -e normal --prefix none --format '{p}')
if found=$(grep -E "$forbidden" <<<"$tree" | sed 's/ (\*)$//' | sort -u) && [ -n "$found" ]; then
    echo "check-thin-member: ledger-member depends on database or server crates:" >&2
    echo "$found" >&2
    echo "(cargo tree -p ledger-member -e normal -i CRATE shows the path)" >&2
    exit 1
fi
echo "check-thin-member: no database or server crate in ledger-member's dependencies"

[ "${1:-}" = "--release" ] || exit 0

cargo build --release -p ledger-member
binary=target/release/member
# glibc's C runtime: libc, libm, libgcc_s (unwinding), the dynamic loader, the vDSO; and, on
# glibc before 2.34, the pieces it later merged into libc (libpthread, libdl, librt).
allowed='^(linux-vdso\.so|linux-gate\.so|libc\.so|libm\.so|libgcc_s\.so|libpthread\.so|libdl\.so|librt\.so|/[^ ]*/ld-linux[^ ]*\.so|ld-linux[^ ]*\.so)'
libraries=$(ldd "$binary" | awk '{print $1}')
if others=$(grep -Ev "$allowed" <<<"$libraries") && [ -n "$others" ]; then
    echo "check-thin-member: $binary links more than the C runtime:" >&2
    echo "$others" >&2
    exit 1
fi
size=$(stat -c %s "$binary")
limit=$((8 * 1024 * 1024))
if [ "$size" -ge "$limit" ]; then
    echo "check-thin-member: $binary is $size bytes, over 8 MiB ($limit)" >&2
    exit 1
fi
echo "check-thin-member: $binary links $(echo $libraries | tr ' ' ','); $size bytes ($(awk "BEGIN {printf \"%.2f\", $size / 1048576}") MiB)"
