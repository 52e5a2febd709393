#!/usr/bin/env python3
"""A Python client of the Ledger master, generated from proto/ledger/v1/ledger.proto at run time.

Nothing generated is checked in: `load_stubs()` runs grpcio-tools' protoc on the .proto files (as
`python -m grpc_tools.protoc -Iproto --python_out=OUT --grpc_python_out=OUT
ledger/v1/ledger.proto ledger/v1/errors.proto`) and imports the result. Needs `pip install grpcio
grpcio-tools`, and grpcio-status for `refusal()` (why the master refused a call).

Run the demo against a master (it inserts, gets, lists, streams, resumes and deletes):

    python examples/python/ledger_client.py --addr 127.0.0.1:32048

Use it as a library:

    from ledger_client import LedgerClient
    with LedgerClient("127.0.0.1:32048") as c:
        p = c.insert({"operator": {"name": "op1", "company": "Acme", "port": 32148}})
        c.list("operator", {"company": "Acme"})
        c.stream(after_seq=0)          # [("reset", ...), ("inserted", ...), ..., ("caught_up", seq)]
    try:
        c.insert({"operator": {"name": "op1", "company": "Acme", "port": 32148}})
    except grpc.RpcError as e:
        refusal(e)                     # ("POLICY_EXISTS", {"policy_id": "..."})
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import grpc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(REPO, "proto")
PROTO_FILES = ["ledger/v1/ledger.proto", "ledger/v1/errors.proto"]
# The domain of the google.rpc.ErrorInfo of the master's refusals (proto/ledger/v1/errors.proto).
REASON_DOMAIN = "ledger.v1"

_stubs = None


def load_stubs(proto_dir: str = PROTO_DIR, out_dir: Optional[str] = None):
    """Generates the Python code of ledger.proto and errors.proto into out_dir (a new temp dir by
    default) with grpc_tools.protoc and returns the modules (ledger_pb2, ledger_pb2_grpc);
    errors_pb2 (the ErrorReason enum) is then importable as ledger.v1.errors_pb2."""
    global _stubs
    if _stubs is not None:
        return _stubs
    out_dir = out_dir or tempfile.mkdtemp(prefix="ledger-pb-")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
           f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTO_FILES]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"protoc failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
    sys.path.insert(0, out_dir)
    pb2 = importlib.import_module("ledger.v1.ledger_pb2")
    pb2_grpc = importlib.import_module("ledger.v1.ledger_pb2_grpc")
    _stubs = (pb2, pb2_grpc)
    return _stubs


@dataclass
class Policy:
    """One stored policy: id, type, the completed JSON line and the seq of its insert."""
    id: str
    type: str
    json: str
    seq: int

    @property
    def body(self) -> dict:
        """The policy body, e.g. {"name": ..., "id": ..., "date": ..., "ledger": "global"}."""
        return json.loads(self.json)[self.type]


def _policy(p) -> Policy:
    return Policy(id=p.id, type=p.type, json=p.json, seq=p.seq)


def refusal(error: grpc.RpcError) -> Optional[tuple]:
    """Why the master refused a call: (reason, metadata) from the google.rpc.ErrorInfo in the
    status details, e.g. ("POLICY_EXISTS", {"policy_id": "..."}) or ("POLICY_INVALID",
    {"problem": "INVALID_JSON", "line": "1", "column": "2"}); the reasons and their metadata are
    the ErrorReason enum of proto/ledger/v1/errors.proto. None for a status that did not come from
    the master (a transport failure, the client's own deadline). Branch on this and the code,
    not on the message. Needs grpcio-status (which brings googleapis-common-protos)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == REASON_DOMAIN:
            return info.reason, dict(info.metadata)
    return None


def event_tuple(resp) -> tuple:
    """A StreamLedgerResponse as a plain tuple:
    ("reset", seq, snapshot_seq, policy_count), ("inserted", seq, Policy),
    ("deleted", seq, id), ("caught_up", seq) or ("progress", seq, head_seq)."""
    kind = resp.WhichOneof("event")
    if kind == "reset":
        return ("reset", resp.seq, resp.reset.snapshot_seq, resp.reset.policy_count)
    if kind == "inserted":
        return ("inserted", resp.seq, _policy(resp.inserted))
    if kind == "deleted_id":
        return ("deleted", resp.seq, resp.deleted_id)
    if kind == "caught_up":
        return ("caught_up", resp.seq)
    if kind == "progress":
        return ("progress", resp.seq, resp.progress.head_seq)
    raise ValueError(f"unknown StreamLedger event: {resp}")


class LedgerClient:
    """A thin client of ledger.v1.LedgerService. Every unary call has a deadline (`timeout`
    seconds); errors are grpc.RpcError with .code() ALREADY_EXISTS, INVALID_ARGUMENT,
    NOT_FOUND, UNAVAILABLE..., and the master's reason: refusal(error)."""

    def __init__(self, addr: str, timeout: float = 10.0, proto_dir: str = PROTO_DIR):
        self.pb2, pb2_grpc = load_stubs(proto_dir)
        self.addr = addr
        self.timeout = timeout
        self.channel = grpc.insecure_channel(addr)
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        self.stub = pb2_grpc.LedgerServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def insert(self, policy) -> Policy:
        """Inserts a policy (a dict, or JSON text) and returns it completed (id, date, ledger)."""
        text = policy if isinstance(policy, str) else json.dumps(policy)
        req = self.pb2.InsertPolicyRequest(policy_json=text)
        return _policy(self.stub.InsertPolicy(req, timeout=self.timeout).policy)

    def get(self, policy_id: str) -> Policy:
        req = self.pb2.GetPolicyRequest(id=policy_id)
        return _policy(self.stub.GetPolicy(req, timeout=self.timeout).policy)

    def delete(self, policy_id: str) -> int:
        """Deletes a policy by id and returns the seq of the delete."""
        req = self.pb2.DeletePolicyRequest(id=policy_id)
        return self.stub.DeletePolicy(req, timeout=self.timeout).seq

    def list(self, type: str = "", where: Optional[dict] = None, page_size: int = 0) -> list:
        """Every policy of `type` (all types when empty) whose body has key == value for every
        item of `where` (a non-string attribute is compared by its JSON text: "32148"), in
        ledger order; follows next_page_token until the last page."""
        conds = [self.pb2.Condition(key=k, value=str(v)) for k, v in (where or {}).items()]
        out, token = [], ""
        while True:
            req = self.pb2.ListPoliciesRequest(type=type, conditions=conds,
                                               page_size=page_size, page_token=token)
            resp = self.stub.ListPolicies(req, timeout=self.timeout)
            out.extend(_policy(p) for p in resp.policies)
            token = resp.next_page_token
            if not token:
                return out

    def info(self):
        """GetLedgerInfo: head_seq, policy_count, digest, oldest_replayable_seq."""
        return self.stub.GetLedgerInfo(self.pb2.GetLedgerInfoRequest(), timeout=self.timeout)

    def subscribe(self, after_seq: int, timeout: Optional[float] = None,
                  node_name: str = "", session_id: str = ""):
        """Opens StreamLedger after `after_seq`; returns the call: iterate it for
        StreamLedgerResponse messages, .cancel() it to stop. The stream never ends by itself.
        With `node_name`, the stream names its subscriber (ListSubscribers shows it); with
        `session_id` too, report() can say what it made durable."""
        req = self.pb2.StreamLedgerRequest(after_seq=after_seq)
        if node_name:
            req.subscriber.node_name = node_name
            req.subscriber.version = "python-example"
            req.subscriber.session_id = session_id
        return self.stub.StreamLedger(req, timeout=timeout or self.timeout)

    def report(self, session_id: str, durable_seq: int):
        """ReportProgress: the seq a subscriber's stream (opened with this session id) made
        durable; returns the master's head."""
        req = self.pb2.ReportProgressRequest(session_id=session_id, durable_seq=durable_seq)
        return self.stub.ReportProgress(req, timeout=self.timeout)

    def subscribers(self):
        """ListSubscribers: head_seq, and each subscriber (node_name, peer, sent_seq,
        durable_seq, lag, via, ...), its own streams and those its relays reported."""
        return self.stub.ListSubscribers(self.pb2.ListSubscribersRequest(), timeout=self.timeout)

    def stream(self, after_seq: int = 0, timeout: Optional[float] = None) -> list:
        """The events of StreamLedger after `after_seq` up to and including `caught_up` (progress
        messages left out), as event tuples; then the stream is cancelled."""
        call = self.subscribe(after_seq, timeout)
        events = []
        try:
            for resp in call:
                ev = event_tuple(resp)
                if ev[0] == "progress":
                    continue
                events.append(ev)
                if ev[0] == "caught_up":
                    return events
        finally:
            call.cancel()
        raise RuntimeError(f"StreamLedger ended before caught_up: {events}")


def describe(ev: tuple) -> str:
    if ev[0] == "inserted":
        return f"seq {ev[1]}: inserted {ev[2].type} {ev[2].id}"
    if ev[0] == "reset":
        return f"seq {ev[1]}: reset (snapshot at seq {ev[2]}, {ev[3]} policies follow)"
    if ev[0] == "deleted":
        return f"seq {ev[1]}: deleted {ev[2]}"
    return f"seq {ev[1]}: {ev[0]}"


def demo(addr: str, suffix: str) -> None:
    """Inserts three policies named with `suffix`, reads them back, streams and deletes one."""
    with LedgerClient(addr) as c:
        print(f"connected to {addr}; head seq {c.info().head_seq}")
        company = f"Demo {suffix}"
        ids = []
        for i in (1, 2, 3):
            p = c.insert({"operator": {"name": f"op{i}-{suffix}", "company": company,
                                       "ip": f"10.0.0.{i}", "port": 32148}})
            print(f"InsertPolicy  -> {p.type} {p.id} at seq {p.seq}: {p.json}")
            ids.append(p)
        try:
            c.insert({"operator": {"name": f"op1-{suffix}", "company": company,
                                   "ip": "10.0.0.1", "port": 32148}})
        except grpc.RpcError as e:
            print(f"InsertPolicy  (same policy again) -> {e.code().name} {refusal(e)}: "
                  f"{e.details()}")
        got = c.get(ids[0].id)
        print(f"GetPolicy     {ids[0].id} -> {got.body['name']} (seq {got.seq})")
        found = c.list("operator", {"company": company})
        print(f"ListPolicies  operator where company={company!r} -> {[p.id for p in found]}")
        found = c.list("operator", {"company": company, "name": f"op2-{suffix}"})
        print(f"ListPolicies  operator where company, name=op2-{suffix} -> {[p.id for p in found]}")

        events = c.stream(after_seq=0)
        print(f"StreamLedger  after_seq 0 -> {len(events)} events:")
        shown = events if len(events) <= 6 else events[:3] + [None] + events[-2:]
        for ev in shown:
            print("    " + (describe(ev) if ev else "…"))
        middle = ids[0].seq
        events = c.stream(after_seq=middle)
        print(f"StreamLedger  after_seq {middle} (resume) -> exactly the changes after it:")
        for ev in events:
            print("    " + describe(ev))

        seq = c.delete(ids[2].id)
        print(f"DeletePolicy  {ids[2].id} -> seq {seq}")
        try:
            c.get(ids[2].id)
        except grpc.RpcError as e:
            print(f"GetPolicy     {ids[2].id} -> {e.code().name} {refusal(e)}: {e.details()}")
        events = c.stream(after_seq=seq - 1)
        print(f"StreamLedger  after_seq {seq - 1} -> {[describe(ev) for ev in events]}")
        info = c.info()
        print(f"GetLedgerInfo -> head_seq {info.head_seq}, {info.policy_count} policies, "
              f"digest {info.digest}")


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", default="127.0.0.1:32048", help="the master, HOST:PORT")
    ap.add_argument("--suffix", default=uuid.uuid4().hex[:8],
                    help="makes the demo's policy names unique (default: random)")
    args = ap.parse_args(argv)
    try:
        demo(args.addr, args.suffix)
    except grpc.FutureTimeoutError:
        print(f"error: no master answers at {args.addr}", file=sys.stderr)
        return 3
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
