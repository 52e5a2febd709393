#!/usr/bin/env bash
# Walks through the Ledger gRPC API of a running master with grpcurl, using server reflection
# only (no .proto file), and checks every answer. Exits non-zero at the first wrong answer.
#
# Usage: scripts/grpcurl-walkthrough.sh HOST:PORT
#   GRPCURL  the grpcurl binary (default: grpcurl); e.g. /work/tools-venv/bin/grpcurl
#   BUF      optional buf binary; when set, a few calls are repeated with `buf curl`
#
# It inserts (and deletes) a few policies with names unique to the run, so it can run again
# against the same master. Point it at a quiet master: the digest check assumes no other
# writer changes the ledger while it runs (it retries a few times if one does).
# Needs bash, python3 and grpcurl; jq is used for the file example when present.
set -euo pipefail

ADDR=${1:?usage: $0 HOST:PORT}
GRPCURL=${GRPCURL:-grpcurl}
BUF=${BUF:-}

command -v "$GRPCURL" >/dev/null || { echo "FAIL: grpcurl not found: $GRPCURL" >&2; exit 2; }
command -v python3 >/dev/null || { echo "FAIL: python3 not found" >&2; exit 2; }

TMP=$(mktemp -d)
STREAM_PID=
cleanup() {
    if [ -n "$STREAM_PID" ]; then kill "$STREAM_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

PASSED=0
ok() { PASSED=$((PASSED + 1)); echo "ok $PASSED - $*"; }
fail() { echo "FAIL: $*" >&2; echo "$PASSED passed, 1 failed" >&2; exit 1; }

# grpcurl against the master; unary calls end after 10 s at most.
g() { "$GRPCURL" -plaintext -connect-timeout 5 -max-time 10 "$@"; }
SVC=ledger.v1.LedgerService

# py 'PYTHON' ARGS... : runs a check on the JSON on stdin (as `r`); a failed assert fails the step.
py() {
    local code=$1
    shift
    python3 -c "import json, sys, hashlib
r = json.load(sys.stdin)
a = sys.argv[1:]
$code" "$@"
}

# Unique names for this run (policy ids are derived from the content).
RUN="walk-$(date +%s)-$$-$RANDOM"
COMPANY="Walk $RUN"

# --- 1. reflection ---------------------------------------------------------------------------
out=$(g "$ADDR" list 2>&1) || fail "list services: $out"
grep -qx "$SVC" <<<"$out" || fail "list: $SVC missing: $out"
grep -qx 'grpc.health.v1.Health' <<<"$out" || fail "list: grpc.health.v1.Health missing: $out"
ok "list shows $SVC and grpc.health.v1.Health"

out=$(g "$ADDR" describe "$SVC" 2>&1) || fail "describe $SVC: $out"
for m in InsertPolicy DeletePolicy GetPolicy ListPolicies GetLedgerInfo; do
    grep -q "rpc $m (" <<<"$out" || fail "describe: rpc $m missing"
done
grep -q 'rpc StreamLedger ( .ledger.v1.StreamLedgerRequest ) returns ( stream ' <<<"$out" \
    || fail "describe: StreamLedger is not server streaming"
ok "describe $SVC shows the six rpcs"

out=$(g "$ADDR" describe ledger.v1.InsertPolicyRequest 2>&1) || fail "describe request: $out"
grep -q 'string policy_json = 1;' <<<"$out" || fail "describe: policy_json = 1 missing: $out"
ok "describe ledger.v1.InsertPolicyRequest shows string policy_json = 1"

# --- 2. health -------------------------------------------------------------------------------
out=$(g "$ADDR" grpc.health.v1.Health/Check 2>&1) || fail "Health/Check: $out"
py 'assert r == {"status": "SERVING"}, r' <<<"$out" || fail "Health/Check: $out"
out=$(g -d "{\"service\": \"$SVC\"}" "$ADDR" grpc.health.v1.Health/Check 2>&1) \
    || fail "Health/Check $SVC: $out"
py 'assert r == {"status": "SERVING"}, r' <<<"$out" || fail "Health/Check $SVC: $out"
ok "Health/Check is SERVING (server and $SVC)"

out=$(g -emit-defaults "$ADDR" $SVC/GetLedgerInfo 2>&1) || fail "GetLedgerInfo: $out"
HEAD0=$(py 'print(int(r["headSeq"]))' <<<"$out") || fail "GetLedgerInfo: $out"

# --- 3. InsertPolicy, inline: policy_json is a JSON string holding JSON ----------------------
out=$(g -d '{"policy_json": "{\"operator\": {\"name\": \"'"$RUN"'-op1\", \"company\": \"'"$COMPANY"'\", \"ip\": \"10.0.0.5\", \"port\": 32148}}"}' \
    "$ADDR" $SVC/InsertPolicy 2>&1) || fail "InsertPolicy inline: $out"
read -r ID1 SEQ1 < <(py '
p = r["policy"]
assert p["type"] == "operator", p
assert len(p["id"]) == 32 and all(c in "0123456789abcdef" for c in p["id"]), p
body = json.loads(p["json"])["operator"]
assert body["name"] == a[0] + "-op1" and body["company"] == a[1] and body["port"] == 32148, body
assert body["id"] == p["id"] and body["ledger"] == "global" and "date" in body, body
assert int(p["seq"]) > int(a[2]), (p["seq"], a[2])
print(p["id"], p["seq"])' "$RUN" "$COMPANY" "$HEAD0" <<<"$out") || fail "InsertPolicy inline: $out"
ok "InsertPolicy (inline) stored operator $ID1 at seq $SEQ1"

# --- 4. InsertPolicy from a file -------------------------------------------------------------
cat >"$TMP/policy.json" <<EOF
{"operator": {"name": "$RUN-op2", "company": "$COMPANY", "ip": "10.0.0.6", "port": 32148}}
EOF
if command -v jq >/dev/null; then
    req=$(jq -Rs '{policy_json: .}' "$TMP/policy.json")
else
    req=$(python3 -c 'import json, sys; print(json.dumps({"policy_json": open(sys.argv[1]).read()}))' "$TMP/policy.json")
fi
out=$(g -d @ "$ADDR" $SVC/InsertPolicy <<<"$req" 2>&1) || fail "InsertPolicy from file: $out"
read -r ID2 SEQ2 < <(py '
p = r["policy"]
assert p["type"] == "operator" and json.loads(p["json"])["operator"]["name"] == a[0] + "-op2", p
assert int(p["seq"]) > int(a[1]), (p["seq"], a[1])
print(p["id"], p["seq"])' "$RUN" "$SEQ1" <<<"$out") || fail "InsertPolicy from file: $out"
[ "$ID2" != "$ID1" ] || fail "InsertPolicy from file: same id as the first policy"
ok "InsertPolicy (from file) stored operator $ID2 at seq $SEQ2"

# --- 5. errors -------------------------------------------------------------------------------
if out=$(g -d @ "$ADDR" $SVC/InsertPolicy <<<"$req" 2>&1); then fail "duplicate insert succeeded: $out"; fi
grep -q 'Code: AlreadyExists' <<<"$out" || fail "duplicate insert: want AlreadyExists: $out"
if out=$(g -d '{"policy_json": "not json"}' "$ADDR" $SVC/InsertPolicy 2>&1); then fail "bad JSON accepted: $out"; fi
grep -q 'Code: InvalidArgument' <<<"$out" || fail "bad JSON: want InvalidArgument: $out"
if out=$(g -d '{"id": "no-such-id"}' "$ADDR" $SVC/GetPolicy 2>&1); then fail "GetPolicy of a missing id succeeded: $out"; fi
grep -q 'Code: NotFound' <<<"$out" || fail "GetPolicy missing id: want NotFound: $out"
ok "errors: AlreadyExists (duplicate), InvalidArgument (bad JSON), NotFound (missing id)"

# --- 6. GetPolicy ----------------------------------------------------------------------------
out=$(g -d "{\"id\": \"$ID1\"}" "$ADDR" $SVC/GetPolicy 2>&1) || fail "GetPolicy: $out"
py '
p = r["policy"]
assert p["id"] == a[0] and p["seq"] == a[1] and p["type"] == "operator", p
assert json.loads(p["json"])["operator"]["name"] == a[2] + "-op1", p' "$ID1" "$SEQ1" "$RUN" <<<"$out" \
    || fail "GetPolicy: $out"
ok "GetPolicy returns $ID1"

# --- 7. ListPolicies with a type and conditions ----------------------------------------------
out=$(g -d "{\"type\": \"operator\", \"conditions\": [{\"key\": \"company\", \"value\": \"$COMPANY\"}]}" \
    "$ADDR" $SVC/ListPolicies 2>&1) || fail "ListPolicies: $out"
py 'ids = [p["id"] for p in r.get("policies", [])]
assert ids == a[0:2], ids
assert not r.get("nextPageToken"), r' "$ID1" "$ID2" <<<"$out" || fail "ListPolicies by company: $out"
# a non-string attribute matches its JSON text; every condition must hold
out=$(g -d "{\"type\": \"operator\", \"conditions\": [{\"key\": \"company\", \"value\": \"$COMPANY\"}, {\"key\": \"port\", \"value\": \"32148\"}, {\"key\": \"name\", \"value\": \"$RUN-op2\"}]}" \
    "$ADDR" $SVC/ListPolicies 2>&1) || fail "ListPolicies 3 conditions: $out"
py 'assert [p["id"] for p in r.get("policies", [])] == a, r' "$ID2" <<<"$out" \
    || fail "ListPolicies 3 conditions: $out"
out=$(g -d "{\"type\": \"table\", \"conditions\": [{\"key\": \"company\", \"value\": \"$COMPANY\"}]}" \
    "$ADDR" $SVC/ListPolicies 2>&1) || fail "ListPolicies other type: $out"
py 'assert not r.get("policies"), r' <<<"$out" || fail "ListPolicies other type: $out"
ok "ListPolicies filters by type and conditions (string and number attributes)"

# paging: page_size 1 gives one policy and a token for the next page
out=$(g -d "{\"type\": \"operator\", \"conditions\": [{\"key\": \"company\", \"value\": \"$COMPANY\"}], \"page_size\": 1}" \
    "$ADDR" $SVC/ListPolicies 2>&1) || fail "ListPolicies page 1: $out"
TOKEN=$(py 'assert [p["id"] for p in r["policies"]] == a, r
print(r["nextPageToken"])' "$ID1" <<<"$out") || fail "ListPolicies page 1: $out"
out=$(g -d "{\"type\": \"operator\", \"conditions\": [{\"key\": \"company\", \"value\": \"$COMPANY\"}], \"page_size\": 1, \"page_token\": \"$TOKEN\"}" \
    "$ADDR" $SVC/ListPolicies 2>&1) || fail "ListPolicies page 2: $out"
py 'assert [p["id"] for p in r["policies"]] == a, r
assert not r.get("nextPageToken"), r' "$ID2" <<<"$out" || fail "ListPolicies page 2: $out"
ok "ListPolicies pages with page_size and next_page_token"

# --- 8. StreamLedger: live changes, and DeletePolicy -----------------------------------------
out=$(g "$ADDR" $SVC/GetLedgerInfo 2>&1) || fail "GetLedgerInfo: $out"
HEAD1=$(py 'print(int(r.get("headSeq", 0)))' <<<"$out") || fail "GetLedgerInfo: $out"
"$GRPCURL" -plaintext -connect-timeout 5 -max-time 4 -d "{\"after_seq\": $HEAD1}" \
    "$ADDR" $SVC/StreamLedger >"$TMP/live.out" 2>"$TMP/live.err" &
STREAM_PID=$!
sleep 1
out=$(g -d '{"policy_json": "{\"table\": {\"name\": \"'"$RUN"'-t\", \"dbms\": \"walk\"}}"}' \
    "$ADDR" $SVC/InsertPolicy 2>&1) || fail "InsertPolicy table: $out"
read -r ID3 SEQ3 < <(py 'p = r["policy"]; assert p["type"] == "table", p; print(p["id"], p["seq"])' <<<"$out") \
    || fail "InsertPolicy table: $out"
out=$(g -d "{\"id\": \"$ID3\"}" "$ADDR" $SVC/DeletePolicy 2>&1) || fail "DeletePolicy: $out"
DSEQ=$(py 'assert int(r["seq"]) > int(a[0]), r; print(r["seq"])' "$SEQ3" <<<"$out") || fail "DeletePolicy: $out"
if out=$(g -d "{\"id\": \"$ID3\"}" "$ADDR" $SVC/GetPolicy 2>&1); then fail "GetPolicy after delete succeeded: $out"; fi
grep -q 'Code: NotFound' <<<"$out" || fail "GetPolicy after delete: want NotFound: $out"
if out=$(g -d "{\"id\": \"$ID3\"}" "$ADDR" $SVC/DeletePolicy 2>&1); then fail "second delete succeeded: $out"; fi
grep -q 'Code: NotFound' <<<"$out" || fail "second DeletePolicy: want NotFound: $out"
ok "DeletePolicy removed $ID3 at seq $DSEQ (then NotFound)"

rc=0
wait "$STREAM_PID" || rc=$?
STREAM_PID=
grep -q 'Code: DeadlineExceeded' "$TMP/live.err" || fail "live stream did not end by -max-time (rc $rc): $(cat "$TMP/live.err")"
# grpcurl prints one indented JSON object per message: decode them one after another
STREAM_PY='
def messages(path):
    text, dec, pos, out = open(path).read(), json.JSONDecoder(), 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return out
        m, pos = dec.raw_decode(text, pos)
        out.append(m)
'
python3 -c "import json, sys
$STREAM_PY
ms = messages(sys.argv[1])
head1, id3, seq3, dseq = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
assert ms and 'caughtUp' in ms[0] and ms[0]['seq'] == head1, ms[:1]
changes = [m for m in ms[1:] if 'progress' not in m]
ins = [m for m in changes if m.get('inserted', {}).get('id') == id3]
dels = [m for m in changes if m.get('deletedId') == id3]
assert len(ins) == 1 and ins[0]['seq'] == seq3 and ins[0]['inserted']['seq'] == seq3, changes
assert len(dels) == 1 and dels[0]['seq'] == dseq, changes
assert changes.index(ins[0]) < changes.index(dels[0]), changes
" "$TMP/live.out" "$HEAD1" "$ID3" "$SEQ3" "$DSEQ" || fail "live stream: $(cat "$TMP/live.out")"
ok "StreamLedger after_seq $HEAD1: caught_up, then live inserted $SEQ3 and deleted_id $DSEQ"

# --- 9. GetLedgerInfo: digest of the whole ledger --------------------------------------------
digest_ok=
for _try in 1 2 3; do
    info1=$(g -emit-defaults "$ADDR" $SVC/GetLedgerInfo 2>&1) || fail "GetLedgerInfo: $info1"
    rm -f "$TMP"/page.*
    token= n=0
    while :; do
        n=$((n + 1))
        g -d "{\"page_token\": \"$token\"}" "$ADDR" $SVC/ListPolicies >"$TMP/page.$(printf %06d $n)" 2>&1 \
            || fail "ListPolicies (all): $(cat "$TMP/page.$(printf %06d $n)")"
        token=$(py 'print(r.get("nextPageToken", ""))' <"$TMP/page.$(printf %06d $n)")
        [ -n "$token" ] || break
    done
    info2=$(g -emit-defaults "$ADDR" $SVC/GetLedgerInfo 2>&1) || fail "GetLedgerInfo: $info2"
    [ "$info1" = "$info2" ] || continue # the ledger changed while we read it
    python3 -c "import json, sys, hashlib
info = json.loads(sys.argv[1])
pols = [p for f in sys.argv[2:] for p in json.load(open(f)).get('policies', [])]
seqs = [int(p['seq']) for p in pols]
assert seqs == sorted(seqs), 'not in ledger order'
assert int(info['policyCount']) == len(pols), (info, len(pols))
text = ''.join(p['json'] + '\n' for p in pols)
assert info['digest'] == hashlib.md5(text.encode()).hexdigest(), info
assert int(info['oldestReplayableSeq']) <= int(info['headSeq'])
" "$info1" "$TMP"/page.* || fail "GetLedgerInfo digest: $info1"
    digest_ok=1
    break
done
[ -n "$digest_ok" ] || fail "the ledger kept changing while the digest was checked"
HEAD2=$(py 'print(r["headSeq"])' <<<"$info1")
[ "$HEAD2" -ge "$DSEQ" ] || fail "GetLedgerInfo head $HEAD2 < last delete seq $DSEQ"
ok "GetLedgerInfo: head $HEAD2, policy_count and md5 digest match ListPolicies"

# --- 10. StreamLedger from 0: a snapshot --------------------------------------------------
rc=0
"$GRPCURL" -plaintext -connect-timeout 5 -max-time 3 -d '{"after_seq": 0}' \
    "$ADDR" $SVC/StreamLedger >"$TMP/snap.out" 2>"$TMP/snap.err" || rc=$?
[ "$rc" -ne 0 ] && grep -q 'Code: DeadlineExceeded' "$TMP/snap.err" \
    || fail "StreamLedger from 0 did not end by -max-time (rc $rc): $(cat "$TMP/snap.err")"
python3 -c "import json, sys
$STREAM_PY
ms = messages(sys.argv[1])
ids = set(sys.argv[2:4])
assert 'reset' in ms[0], ms[0]
snap = ms[0]['reset']
n = int(snap.get('policyCount', 0))
body = ms[1:1 + n]
assert all('inserted' in m for m in body), body
assert ids <= {m['inserted']['id'] for m in body}, 'inserted policies missing from snapshot'
assert sys.argv[4] not in {m['inserted']['id'] for m in body}, 'deleted policy in snapshot'
cu = ms[1 + n]
assert 'caughtUp' in cu and cu['seq'] == snap.get('snapshotSeq', '0'), cu
print(n, cu['seq'])
" "$TMP/snap.out" "$ID1" "$ID2" "$ID3" >"$TMP/snap.res" || fail "StreamLedger from 0: $(head -c 2000 "$TMP/snap.out")"
read -r SNAPN SNAPSEQ <"$TMP/snap.res"
ok "StreamLedger after_seq 0: reset, $SNAPN inserted, caught_up at $SNAPSEQ"

# --- 11. the same with buf curl (optional) ---------------------------------------------------
if [ -n "$BUF" ]; then
    bc() { "$BUF" curl --protocol grpc --http2-prior-knowledge --timeout 10s "$@"; }
    out=$(bc --list-methods "http://$ADDR" 2>&1) || fail "buf curl --list-methods: $out"
    grep -qx "$SVC/StreamLedger" <<<"$out" || fail "buf curl --list-methods: $out"
    out=$(bc "http://$ADDR/$SVC/GetLedgerInfo" 2>&1) || fail "buf curl GetLedgerInfo: $out"
    py 'assert int(r["headSeq"]) >= int(a[0]), r' "$HEAD2" <<<"$out" || fail "buf curl GetLedgerInfo: $out"
    out=$(bc -d "{\"type\": \"operator\", \"conditions\": [{\"key\": \"company\", \"value\": \"$COMPANY\"}]}" \
        "http://$ADDR/$SVC/ListPolicies" 2>&1) || fail "buf curl ListPolicies: $out"
    py 'assert [p["id"] for p in r["policies"]] == a, r' "$ID1" "$ID2" <<<"$out" || fail "buf curl ListPolicies: $out"
    out=$(bc "http://$ADDR/grpc.health.v1.Health/Check" 2>&1) || fail "buf curl Health/Check: $out"
    py 'assert r == {"status": "SERVING"}, r' <<<"$out" || fail "buf curl Health/Check: $out"
    ok "buf curl (reflection v1): list-methods, GetLedgerInfo, ListPolicies, Health/Check"
else
    echo "skip - buf curl checks (set BUF=/path/to/buf to run them)"
fi

echo "$PASSED passed, 0 failed"
