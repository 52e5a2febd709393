"""Tests examples/python/ledger_client.py against the real `master` binary.

Starts `master --listen 127.0.0.1:0 --bind` in a temp dir (SQLite, loopback only), generates
the client from proto/ with grpcio-tools, and checks insert, get, list, delete, errors,
StreamLedger from 0 and resumed from a middle seq, a live change, the digest, the demo script,
and that SIGTERM ends open streams with UNAVAILABLE and the master with exit 0.

    pip install grpcio grpcio-tools grpcio-status pytest
    pytest -v examples/python          # LEDGER_MASTER_BIN=path/to/master (default target/debug/master)

Tests run in file order and share one master.
"""

import hashlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ledger_client  # noqa: E402
from ledger_client import LedgerClient, load_stubs  # noqa: E402

MASTER_BIN = os.environ.get("LEDGER_MASTER_BIN",
                            os.path.join(ledger_client.REPO, "target", "debug", "master"))
START_TIMEOUT = 30  # seconds for the master to log its address
STOP_TIMEOUT = 20   # seconds for the master to exit after SIGTERM

TABLE = {"table": {"dbms": "monitoring", "name": "rand_data",
                   "create": "CREATE TABLE IF NOT EXISTS t (ts TIMESTAMP, v FLOAT)"}}
TABLE_ID = "baf0fe3bb314c6f2a781430cfa174a92"  # AnyLog's md5 id of TABLE
OPS = [
    {"operator": {"name": "op1", "company": "Acme", "ip": "10.0.0.5", "port": 32148}},
    {"operator": {"name": "op2", "company": "Acme", "ip": "10.0.0.6", "port": 32149}},
    {"operator": {"name": "op3", "company": "Other", "ip": "10.0.0.7", "port": 32148}},
]


class Master:
    """The master process: started in a temp dir, its stderr collected by a thread."""

    def __init__(self):
        if not os.access(MASTER_BIN, os.X_OK):
            pytest.fail(f"master binary not found: {MASTER_BIN} "
                        "(cargo build --workspace --bins, or set LEDGER_MASTER_BIN)")
        self.dir = tempfile.TemporaryDirectory(prefix="ledger-pytest-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        self.proc = subprocess.Popen([MASTER_BIN, "--listen", "127.0.0.1:0", "--bind"],
                                     cwd=self.dir.name, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines = []
        self.addr = None
        found = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"listening on (\d+\.\d+\.\d+\.\d+:\d+)", line)
                if m and not found.is_set():
                    self.addr = m.group(1)
                    found.set()
            found.set()

        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()
        if not found.wait(START_TIMEOUT) or self.addr is None:
            self.kill()
            pytest.fail(f"master did not log `listening on ADDR`:\n{self.log()}")

    def log(self) -> str:
        return "".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    def close(self):
        self.kill()
        self.reader.join(5)
        self.dir.cleanup()


@pytest.fixture(scope="module")
def master():
    m = Master()
    yield m
    m.close()


@pytest.fixture(scope="module")
def client(master):
    c = LedgerClient(master.addr, timeout=10)
    yield c
    c.close()


@pytest.fixture(scope="module")
def state():
    return {}


def code_of(call, *args):
    with pytest.raises(grpc.RpcError) as exc:
        call(*args)
    return exc.value.code()


def refused(call, *args):
    """The code and the master's (reason, metadata) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as exc:
        call(*args)
    return exc.value.code(), ledger_client.refusal(exc.value)


def test_generated_stubs():
    pb2, pb2_grpc = load_stubs()
    methods = pb2.DESCRIPTOR.services_by_name["LedgerService"].methods_by_name
    assert set(methods) == {"InsertPolicy", "DeletePolicy", "GetPolicy", "ListPolicies",
                            "GetLedgerInfo", "StreamLedger", "ReportProgress",
                            "ListSubscribers"}
    assert methods["StreamLedger"].server_streaming
    assert hasattr(pb2_grpc, "LedgerServiceStub")


def test_empty_ledger(client):
    info = client.info()
    assert (info.head_seq, info.policy_count) == (0, 0)
    assert info.digest == hashlib.md5(b"").hexdigest()
    assert client.stream(after_seq=0) == [("reset", 0, 0, 0), ("caught_up", 0)]


def test_insert(client, state):
    p = client.insert(TABLE)
    assert (p.id, p.type, p.seq) == (TABLE_ID, "table", 1)
    body = p.body
    assert body["id"] == TABLE_ID and body["ledger"] == "global" and "date" in body
    assert {k: body[k] for k in TABLE["table"]} == TABLE["table"]
    # the completed line keeps the attribute order, then id, date, ledger (json.dumps form)
    assert list(body) == ["dbms", "name", "create", "id", "date", "ledger"]
    assert p.json == json.dumps({"table": body})
    ops = [client.insert(op) for op in OPS]
    assert [p.seq for p in ops] == [2, 3, 4]
    assert all(re.fullmatch(r"[0-9a-f]{32}", p.id) for p in ops)
    assert len({p.id for p in ops}) == 3
    # a policy with its own id keeps it (JSON text works as well as a dict)
    own = client.insert('{"cluster": {"name": "c1", "id": "my-cluster-id"}}')
    assert (own.id, own.type, own.seq) == ("my-cluster-id", "cluster", 5)
    state["table"], state["ops"], state["own"] = p, ops, own


def test_errors(client, state):
    assert code_of(client.insert, TABLE) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(client.insert, "not json") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(client.insert, {"a": {}, "b": {}}) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(client.insert, {"operator": "not an object"}) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(client.get, "no-such-id") == grpc.StatusCode.NOT_FOUND
    assert code_of(client.delete, "no-such-id") == grpc.StatusCode.NOT_FOUND
    # each refusal says why, as data: google.rpc.ErrorInfo, reasons from errors.proto
    assert refused(client.insert, TABLE) == (
        grpc.StatusCode.ALREADY_EXISTS, ("POLICY_EXISTS", {"policy_id": TABLE_ID}))
    code, (reason, metadata) = refused(client.insert, "not json")
    assert (code, reason, metadata["problem"], metadata["line"]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "POLICY_INVALID", "INVALID_JSON", "1")
    assert refused(client.insert, {"a": {}, "b": {}}) == (
        grpc.StatusCode.INVALID_ARGUMENT, ("POLICY_INVALID", {"problem": "WRONG_STRUCTURE"}))
    assert refused(client.get, "no-such-id") == (
        grpc.StatusCode.NOT_FOUND, ("POLICY_NOT_FOUND", {"policy_id": "no-such-id"}))
    assert refused(client.delete, "") == (
        grpc.StatusCode.INVALID_ARGUMENT, ("POLICY_ID_EMPTY", {}))
    # the reasons are the ErrorReason enum generated from errors.proto
    errors_pb2 = importlib.import_module("ledger.v1.errors_pb2")
    for name in ("POLICY_EXISTS", "POLICY_INVALID", "POLICY_NOT_FOUND", "POLICY_ID_EMPTY"):
        assert errors_pb2.ErrorReason.Value(name) > 0
    # nothing above took a seq
    assert client.info().head_seq == 5


def test_get(client, state):
    t = client.get(TABLE_ID)
    assert t == state["table"]
    op2 = state["ops"][1]
    assert client.get(op2.id) == op2
    assert client.get(op2.id).body["name"] == "op2"


def test_list(client, state):
    op1, op2, op3 = state["ops"]
    ids = lambda ps: [p.id for p in ps]  # noqa: E731
    assert ids(client.list("operator", {"company": "Acme"})) == [op1.id, op2.id]
    # a number attribute matches its JSON text; every condition must hold
    assert ids(client.list("operator", {"port": 32148})) == [op1.id, op3.id]
    assert ids(client.list("operator", {"company": "Acme", "port": "32148"})) == [op1.id]
    assert ids(client.list("table", {"dbms": "monitoring"})) == [TABLE_ID]
    assert ids(client.list("table", {"company": "Acme"})) == []
    assert ids(client.list("operator")) == [op1.id, op2.id, op3.id]
    assert [p.seq for p in client.list()] == [1, 2, 3, 4, 5]
    # one policy a page: the client follows next_page_token
    assert ids(client.list("operator", page_size=1)) == [op1.id, op2.id, op3.id]
    pb2 = client.pb2
    resp = client.stub.ListPolicies(pb2.ListPoliciesRequest(type="operator", page_size=2),
                                    timeout=10)
    assert len(resp.policies) == 2 and resp.next_page_token


def test_delete(client, state):
    own = state["own"]
    assert client.delete(own.id) == 6
    assert code_of(client.get, own.id) == grpc.StatusCode.NOT_FOUND
    assert code_of(client.delete, own.id) == grpc.StatusCode.NOT_FOUND
    assert [p.seq for p in client.list()] == [1, 2, 3, 4]


def test_stream_from_zero(client, state):
    table, (op1, op2, op3) = state["table"], state["ops"]
    events = client.stream(after_seq=0)
    assert events == [
        ("reset", 6, 6, 4),
        ("inserted", 1, table),
        ("inserted", 2, op1),
        ("inserted", 3, op2),
        ("inserted", 4, op3),
        ("caught_up", 6),
    ]


def test_stream_resume_from_middle(client, state):
    op2, op3 = state["ops"][1:]
    own = state["own"]
    # after seq 3: exactly the changes 4 (insert op3), 5 (insert own), 6 (delete own)
    assert client.stream(after_seq=3) == [
        ("inserted", 4, op3),
        ("inserted", 5, own),
        ("deleted", 6, own.id),
        ("caught_up", 6),
    ]
    assert client.stream(after_seq=5) == [("deleted", 6, own.id), ("caught_up", 6)]
    assert client.stream(after_seq=6) == [("caught_up", 6)]
    assert op2.seq == 3


def test_stream_live_change(client, state):
    call = client.subscribe(after_seq=6, timeout=15)
    try:
        events = iter(call)
        assert ledger_client.event_tuple(next(events)) == ("caught_up", 6)
        p = client.insert({"operator": {"name": "op4", "company": "Acme", "port": 32150}})
        assert p.seq == 7
        ev = next(e for e in map(ledger_client.event_tuple, events) if e[0] != "progress")
        assert ev == ("inserted", 7, p)
    finally:
        call.cancel()
    state["op4"] = p


def test_subscribers(client):
    head = client.info().head_seq
    call = client.subscribe(after_seq=head, timeout=15, node_name="py-node", session_id="py-1")
    try:
        events = iter(call)
        assert ledger_client.event_tuple(next(events)) == ("caught_up", head)
        assert client.report("py-1", head - 1).head_seq == head
        mine = [s for s in client.subscribers().subscribers if s.node_name == "py-node"]
        assert len(mine) == 1, mine
        assert (mine[0].durable_seq, mine[0].lag, mine[0].via) == (head - 1, 1, "")
        assert mine[0].version == "python-example" and mine[0].peer.startswith("127.0.0.1:")
        assert code_of(client.report, "no-such-session", 1) == grpc.StatusCode.NOT_FOUND
    finally:
        call.cancel()


def test_ledger_info_digest(client):
    info = client.info()
    policies = client.list()
    assert (info.head_seq, info.policy_count) == (7, len(policies)) == (7, 5)
    text = "".join(p.json + "\n" for p in policies)
    assert info.digest == hashlib.md5(text.encode()).hexdigest()


def test_demo_script(master):
    res = subprocess.run([sys.executable, os.path.join(HERE, "ledger_client.py"),
                          "--addr", master.addr, "--suffix", "pytest"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "InsertPolicy  (same policy again) -> ALREADY_EXISTS ('POLICY_EXISTS'" in out
    assert re.search(r"StreamLedger  after_seq 0 -> \d+ events", out)
    assert "reset (snapshot at seq 10, 8 policies follow)" in out
    assert re.search(r"StreamLedger  after_seq 8 \(resume\) -> exactly the changes after it:\n"
                     r"    seq 9: inserted operator [0-9a-f]{32}\n"
                     r"    seq 10: inserted operator [0-9a-f]{32}\n"
                     r"    seq 10: caught_up\n", out), out
    assert re.search(r"GetPolicy     [0-9a-f]{32} -> NOT_FOUND", out)
    assert "GetLedgerInfo -> head_seq 11, 7 policies" in out


def test_sigterm_ends_streams_and_exits_0(master, client):
    call = client.subscribe(after_seq=11, timeout=STOP_TIMEOUT)
    events = iter(call)
    assert ledger_client.event_tuple(next(events)) == ("caught_up", 11)
    master.proc.send_signal(signal.SIGTERM)
    with pytest.raises(grpc.RpcError) as exc:
        for resp in events:
            assert resp.WhichOneof("event") == "progress", resp
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, exc.value
    assert ledger_client.refusal(exc.value) == ("SHUTTING_DOWN", {})
    try:
        rc = master.proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"master still running {STOP_TIMEOUT}s after SIGTERM:\n{master.log()}")
    assert rc == 0, master.log()
    master.reader.join(5)
    assert "received SIGTERM" in master.log()
