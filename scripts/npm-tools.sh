#!/usr/bin/env bash
# Installs the npm tools the tests use (ganache, solc-js; playwright-core for the console), exactly as tests/package-lock.json
# pins them, into tests/node_modules: `npm ci`, only when node_modules is missing or was installed
# from another lockfile. Sourced by scripts/test.sh and scripts/compile-contract.sh, or run alone.
#
# There is no fallback: without node and npm this fails, so the chain tests never skip.

ledger_npm_tools() {
    local root tests stamp want
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tests="$root/tests"
    for tool in node npm; do
        command -v "$tool" >/dev/null || {
            echo "npm-tools: '$tool' is not installed: the chain tests need Node.js and npm" \
                 "(ganache and solc come from the npm registry; apt-get install nodejs npm)" >&2
            return 1
        }
    done
    # The stamp holds the lockfile's hash as of the last `npm ci`: a changed lockfile (a new pin)
    # means a stale node_modules, whatever its timestamps say.
    stamp="$tests/node_modules/.ledger-lock-sha256"
    want=$(sha256sum "$tests/package-lock.json" | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && [ -e "$tests/node_modules/ganache/package.json" ] \
        && [ -e "$tests/node_modules/solc/package.json" ] \
        && [ -e "$tests/node_modules/playwright-core/package.json" ]; then
        return 0
    fi
    echo "npm-tools: npm ci in tests/ (ganache, solc, playwright-core from tests/package-lock.json)" >&2
    (cd "$tests" && npm ci --no-audit --no-fund --loglevel=error) || {
        echo "npm-tools: npm ci failed in $tests" >&2
        return 1
    }
    echo "$want" >"$stamp"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    ledger_npm_tools
fi
