#!/usr/bin/env bash
# Compiles the contract master/chain/contract/PolicyLedger.sol with solc-js (the npm `solc` that
# tests/package-lock.json pins) for the `shanghai` EVM into master/chain/contract/PolicyLedger.json,
# the artifact (ABI, bytecode) that is committed so that builds need no Solidity compiler.
#
#   scripts/compile-contract.sh           regenerates the artifact
#   scripts/compile-contract.sh --check   fails if the committed artifact is not what the source
#                                         compiles to (scripts/test.sh runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/npm-tools.sh
ledger_npm_tools
exec node scripts/compile-contract.js "$@"
