#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the storage suite on SQLite and on a real
# PostgreSQL server, and the end-to-end tests of the real master and member binaries.
#
# The PostgreSQL tests start a throwaway server from the PostgreSQL server binaries
# (/usr/lib/postgresql/*/bin, or LEDGER_PG_BIN), or use LEDGER_TEST_POSTGRES_URL. On a machine
# without them this script installs Debian's postgresql package when it can (root with apt-get)
# and otherwise stops: the PostgreSQL tests never skip.
#
# The chain tests run ganache and the contract's compiler (solc-js) from tests/node_modules,
# which `npm ci` installs from tests/package-lock.json when it is missing or stale
# (scripts/npm-tools.sh). Without Node.js and npm this script installs Debian's nodejs and npm
# when it can (root with apt-get) and otherwise stops: the chain tests never skip either.
set -euo pipefail
cd "$(dirname "$0")/.."

have_postgres() {
    [ -n "${LEDGER_TEST_POSTGRES_URL:-}" ] && return 0
    [ -n "${LEDGER_PG_BIN:-}" ] && [ -x "${LEDGER_PG_BIN}/initdb" ] && return 0
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if ! have_postgres; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing the PostgreSQL server (apt-get install postgresql)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    have_postgres || {
        echo "test.sh: no PostgreSQL server binaries: install postgresql or set LEDGER_TEST_POSTGRES_URL" >&2
        exit 1
    }
fi
if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing Node.js and npm (apt-get install nodejs npm)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    fi
fi
# The console tests drive Debian's Chromium (playwright-core never downloads a browser).
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing Chromium (apt-get install chromium)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
    command -v chromium >/dev/null || {
        echo "test.sh: no chromium: the console tests need Debian's chromium package (apt-get install chromium)" >&2
        exit 1
    }
fi
# shellcheck source=scripts/npm-tools.sh
source scripts/npm-tools.sh
ledger_npm_tools || {
    echo "test.sh: the chain and console tests need ganache, solc and playwright-core from npm (see above)" >&2
    exit 1
}
# The committed contract artifact is what its source compiles to.
scripts/compile-contract.sh --check

command -v python3 >/dev/null || {
    echo "test.sh: python3 is needed (the member tests read blockchain.json with json.loads)" >&2
    exit 1
}

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The end-to-end tests start the binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace 2>&1 | tee "$log"

# Fail loudly if the PostgreSQL half of the suite did not run.
pg_passed=$(grep -c -E '^test postgres::[a-z_0-9]+ \.\.\. ok$' "$log" || true)
if [ "$pg_passed" -lt 20 ]; then
    echo "test.sh: only $pg_passed PostgreSQL tests passed; expected the whole PostgreSQL suite" >&2
    exit 1
fi
# And the chain half, against ganache.
chain_passed=$(grep -c -E '^test chain::[a-z_0-9]+ \.\.\. ok$' "$log" || true)
if [ "$chain_passed" -lt 10 ]; then
    echo "test.sh: only $chain_passed chain tests passed; expected every test of tests/tests/chain_e2e.rs" >&2
    exit 1
fi
# And the console's, in Chromium.
console_passed=$(grep -c -E '^test (the_console_shows_counts_the_map_and_a_new_insert_within_a_second|without_a_reader_token_the_console_is_refused|a_200_policy_network_on_the_map|the_map_of_10000_policies_is_drawn_zoomed_and_searched|the_feed_is_server_sent_events_within_the_stream_limits|a_lagging_member_shows_its_lag) \.\.\. ok$' "$log" || true)
if [ "$console_passed" -lt 6 ]; then
    echo "test.sh: only $console_passed console tests passed; expected the 6 of tests/tests/console_e2e.rs (5 in Chromium)" >&2
    exit 1
fi
echo "test.sh: all tests passed ($pg_passed of them on PostgreSQL, $chain_passed against ganache, $console_passed in Chromium)"
