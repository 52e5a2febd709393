#!/usr/bin/env python3
"""Writes tests/data/pyformat-golden.jsonl: what CPython 3.11 prints for values parsed by
json.loads, to check ledger_proto::pyformat against (the Rust test needs no Python).

Each line is {"input": <JSON text>, "str": str(json.loads(input)),
"dumps": json.dumps(json.loads(input))}.

Usage (from the workspace root): python3 scripts/gen_pyformat_golden.py
"""

import json
import random
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "pyformat-golden.jsonl"
VECTORS = ROOT / "tests" / "data" / "policy-ids.jsonl"


def is_surrogate(cp: int) -> bool:
    return 0xD800 <= cp <= 0xDFFF


def string_inputs() -> list[str]:
    texts = [
        "", "plain", "it's", 'say "hi"', "both ' and \"", "'", '"', "''\"", "\"'\"",
        "back\\slash", "tab\there", "line\nbreak", "cr\rlf\n", "nul\x00x", "del\x7f",
        "\x08\x0c\x0b\x1b\x1f", "nbsp\u00a0", "soft\u00adhyphen", "zw\u200b", "zwj\u200d",
        "ls\u2028ps\u2029", "ideo\u3000space", "bom\ufeff", "priv\ue000\uf8ff", "rep\ufffd",
        "nonchar\ufffe\uffff", "emoji\U0001f680\U0001f600", "max\U0010ffff", "tag\U000e0001",
        "math\U0001d400", "unassigned\u0378\U0002fffe", "Δelta", "日本", "naïve", "é",
        "pct%s", "{braces}", "a\u0085b", "\u00ff\u0100\uffff\U00010000",
        "mixed 'single' and \"double\" and \\ and \t",
    ]
    # Every C0/C1 control character and DEL, one by one.
    texts += [chr(cp) for cp in list(range(0x20)) + list(range(0x7F, 0xA1))]
    # Both sides of every boundary between printable and non-printable code points, and a
    # random sample, in strings of 64 characters.
    boundary = []
    for cp in range(1, sys.maxunicode + 1):
        if chr(cp).isprintable() != chr(cp - 1).isprintable():
            boundary += [cp - 1, cp]
    rng = random.Random(20260720)
    sample = [rng.randrange(sys.maxunicode + 1) for _ in range(4000)]
    cps = [cp for cp in boundary + sample if not is_surrogate(cp)]
    texts += ["".join(map(chr, cps[i : i + 64])) for i in range(0, len(cps), 64)]
    return [json.dumps(t, ensure_ascii=(i % 2 == 0)) for i, t in enumerate(texts)]


def number_inputs() -> list[str]:
    literals = [
        "0", "-0", "1", "-1", "0.0", "-0.0", "-0e0", "0e5", "1.0", "1E2", "1e+05", "1e-05",
        "0.1", "0.10000000000000001", "0.0001", "0.00001", "0.000123", "1e16", "1e15",
        "9999999999999998.0", "1e22", "1e-5", "123456789.123", "123456789.125", "5e-324",
        "4.9406564584124654e-324", "2.2250738585072014e-308", "1.7976931348623157e308",
        "-1.7976931348623157e308", "1e-400", "-1e-400", "1.5e-7", "2.5e+300", "-1.2345e300",
        "9007199254740993", "9007199254740993.0", "123456789012345678901234567890.0",
        "9223372036854775807", "9223372036854775808", "-9223372036854775808",
        "-9223372036854775809", "18446744073709551615", "18446744073709551616",
        "1" + "0" * 99, "-" + "9" * 100, "7" * 4300, "0.3", "2.675", "1e23", "8.41e21",
        "4.35679e-10", "1.0e-7", "100", "1E-4", "1e-4",
    ]
    for k in range(-8, 21):
        literals += [f"1e{k}", f"1.5e{k}", f"-9.87654321e{k}"]
    rng = random.Random(4300)
    # Random finite doubles from random bits, written in Python's own shortest form.
    for _ in range(3000):
        f = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        if f == f and f not in (float("inf"), float("-inf")):
            literals.append(repr(f))
    # Doubles whose exact value lies halfway between the two closest shortest candidates
    # (1340494816840732.25: Python picks the even `...732.2`).
    for e in range(47, 52):
        ulp = 2.0 ** (e - 52)
        for _ in range(100):
            literals.append(repr(rng.randrange(2**e, 2 ** (e + 1)) + ulp * rng.randrange(int(1 / ulp))))
    # Random decimal literals that are not shortest forms (checks correctly rounded parsing).
    for _ in range(2000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 25)))
        digits = digits.lstrip("0") or "0"
        frac = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 20)))
        literals.append(f"{rng.choice(['', '-'])}{digits}.{frac}e{rng.randint(-330, 300)}")
    return literals


def structure_inputs() -> list[str]:
    return [
        "{}", "[]", "true", "false", "null", "[{}, [], [[]], {\"a\": {}}]",
        '{"a": 1, "b": 2, "a": 3}', '{"x": {"k": 1, "j": 2, "k": [3]}, "y": 0, "x": {"z": 1}}',
        ' { "a" : [ 1 , 2.0 , true , null , "s" ] , "b" : { } } ',
        '{"it\'s": "say \\"hi\\"", "": "", "\\u0000": null}',
        '{"operator": {"name": "n", "nested": {"list": [1, -0.0, 1e16, "x\'y"], "t": true}}}',
        '[[[[[[[[[[["deep"]]]]]]]]]]]',
    ]


def main() -> None:
    inputs = string_inputs() + number_inputs() + structure_inputs()
    inputs += [json.loads(line)["input"] for line in VECTORS.read_text().splitlines() if line]
    seen = set()
    with OUT.open("w") as out:
        for text in inputs:
            if text in seen:
                continue
            seen.add(text)
            value = json.loads(text)
            line = {"input": text, "str": str(value), "dumps": json.dumps(value)}
            out.write(json.dumps(line) + "\n")
    print(f"wrote {len(seen)} cases to {OUT}")


if __name__ == "__main__":
    main()
