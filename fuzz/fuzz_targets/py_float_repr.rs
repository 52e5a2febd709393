//! `pyformat::py_float_repr` on every double: it never panics, a finite value's text reads back
//! to the same double (sign of zero included), looks like a Python float (a `.` or an exponent,
//! no trailing zero in the digits), and as a JSON float literal it prints the same.
#![no_main]

use ledger_anylog::pyformat::{json_dumps, py_float_repr};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|bits: u64| {
    let f = f64::from_bits(bits);
    let text = py_float_repr(f);
    if !f.is_finite() {
        return;
    }
    let back: f64 = text.parse().unwrap_or_else(|e| panic!("{f:?} -> {text}: {e}"));
    assert_eq!(back.to_bits(), f.to_bits(), "{f:?} -> {text}");
    assert!(text.contains(['.', 'e']), "{f:?} -> {text}");
    let mantissa = text.split('e').next().unwrap();
    if let Some((_, fraction)) = mantissa.split_once('.') {
        assert!(fraction == "0" || !fraction.ends_with('0'), "{f:?} -> {text}");
    }
    // The same double, read from a JSON float literal, dumps to the same text.
    let literal = format!("{f:e}");
    let value: Value = serde_json::from_str(&literal).unwrap();
    assert_eq!(json_dumps(&value), text, "{literal}");
});
