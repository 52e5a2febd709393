#!/usr/bin/env python3
"""Writes tests/data/complete-policies.jsonl: policies that arrive complete (with `id` and
`date`, as EdgeLake nodes push them) and the line a master stores for each, which is Python's
`json.dumps` of the policy as parsed, key order and every attribute kept (nothing is completed).

Run from the repository root: python3 scripts/gen_complete_policy_vectors.py
"""
import json

INPUTS = [
    # A node's cluster: `status` after `date`, inside the table entries too.
    '{"cluster": {"company": "Acme Inc", "name": "c1", "table": [{"dbms": "d", "name": "t", "status": "active"}], "id": "0d69b1e80a299a368ae9d22b146e980c", "date": "2026-12-01T22:52:57.606908Z", "status": "active", "ledger": "global"}}',
    # An operator whose `member` a node added after `date`.
    '{"operator": {"name": "op1", "company": "Acme", "ip": "10.0.0.5", "port": 32148, "cluster": "c0", "id": "7c2ae93685a13ac76bd5e31b0fbdb381", "date": "2026-12-01T23:05:05.504948Z", "member": 170, "ledger": "global"}}',
    # Compact JSON (orjson), stored in Python's form.
    '{"config":{"id":"x1","date":"2026-01-01T00:00:00.000000Z","values":[1,2.5,true,null],"nested":{"a":{"b":[]}}}}',
    # `date` before `id`, no `ledger`: nothing added.
    '{"config": {"date": "2026-01-01T00:00:00.000000Z", "name": "n", "id": "i2"}}',
    # A local policy pushed as it is.
    '{"tag": {"name": "t", "id": "i3", "date": "2026-02-03T04:05:06.789012Z", "ledger": "local"}}',
    # Non-ASCII text, escaped as json.dumps escapes it; an apostrophe and a pipe kept.
    '{"operator": {"name": "caf\u00e9 \u4e2d", "company": "O\'Brien | Sons", "id": "i4", "date": "2026-03-04T05:06:07.000001Z"}}',
    # A date that is not a time is kept as it is.
    '{"config": {"id": "i5", "date": "yesterday", "x": 1.0, "y": 1e16, "z": -0.0}}',
    # Keys in any order, a duplicate key (first place, last value, as Python reads it).
    '{"master": {"z": 1, "id": "i6", "a": 2, "z": 3, "date": "2026-04-05T06:07:08.123456Z"}}',
]

with open("tests/data/complete-policies.jsonl", "w") as out:
    for text in INPUTS:
        out.write(json.dumps({"input": text, "stored": json.dumps(json.loads(text))}) + "\n")
