//! Python's text forms of a JSON value as Python's `json.loads` would have parsed it.
//!
//! AnyLog/EdgeLake is written in Python: a policy id is the md5 of Python's `str()` of the policy
//! dict, and `blockchain.json` holds `json.dumps` lines. To agree byte for byte, this module
//! reproduces CPython 3.11's `str()`, `repr()` and `json.dumps()` for the values `json.loads`
//! returns: `dict` (insertion order), `list`, `str`, `int` (a JSON number without `.`, `e`, `E`),
//! `float` (any other number), `True`/`False` and `None`.
//!
//! Numbers are read from their literal text (serde_json's `arbitrary_precision`), so integers of
//! any size print exactly as Python prints them.

mod printable;

use serde_json::{Number, Value};
use std::fmt::Write as _;

/// Python's `str()` of the value: a string gives its own text, unquoted; anything else gives
/// [`py_repr`] (Python's `str()` and `repr()` only differ for strings at the top level).
pub fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

/// Python's `repr()` of the value, e.g. `{'a': 1, 'b': [True, None], 'c': "it's"}`.
///
/// Dicts and lists use `', '` and `': '` separators, strings Python's quoting and escapes
/// (non-printable characters escaped, printable non-ASCII characters as themselves), floats
/// Python's shortest round-trip `float.__repr__`.
pub fn py_repr(v: &Value) -> String {
    let mut out = String::new();
    write_repr(&mut out, v);
    out
}

/// Python's `json.dumps()` of the value with its default arguments: `", "` and `": "`
/// separators, `ensure_ascii=True` (every character outside ASCII 0x20..=0x7e escaped as
/// lowercase `\uXXXX`, characters beyond the BMP as a surrogate pair), numbers as Python prints
/// them.
pub fn json_dumps(v: &Value) -> String {
    let mut out = String::new();
    write_json(&mut out, v);
    out
}

/// Python's `repr()` of a `str`.
pub fn py_repr_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    write_repr_str(&mut out, s);
    out
}

/// Python's `repr()` of a `float` (the same as its `str()` and its `json.dumps()` form for finite
/// values): the shortest digits that round-trip, in fixed notation when the decimal exponent is
/// in `-4..16` (`0.0001`, `100.0`), in scientific notation otherwise (`1e-05`, `1.5e+16`).
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, `d[.ddd]e[-]x`, as Python's
    // `repr` does. Among several shortest candidates Python takes the one closest to the exact
    // value, ties to even (1340494816840732.25 gives `...732.2`) where Rust may not, so also
    // round the exact value correctly (half to even) to that many digits and keep it when it
    // round-trips (it may not next to a power of two, where the gap below is half the gap above).
    let abs = f.abs();
    let mut sci = format!("{abs:e}");
    let digit_count =
        sci.find('e').expect("`{:e}` always has an exponent") - usize::from(sci.contains('.'));
    if digit_count > 1 {
        let nearest = format!("{abs:.*e}", digit_count - 1);
        if nearest != sci && nearest.parse::<f64>() == Ok(abs) {
            sci = nearest;
        }
    }
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    // Python's digits never end in a zero; neither should ours, but `{:.Ne}` would keep them.
    let digits = mantissa.replace('.', "");
    let digits = match digits.trim_end_matches('0') {
        "" => "0",
        trimmed => trimmed,
    };
    let mut out = String::with_capacity(digits.len() + 8);
    if f.is_sign_negative() {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        // Python writes the exponent with a sign and at least two digits.
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

/// Whether CPython 3.11's `str.isprintable()` is true for this character.
pub fn is_printable(c: char) -> bool {
    let cp = u32::from(c);
    // Fast path: printable ASCII, the overwhelmingly common case.
    if (0x20..0x7f).contains(&cp) {
        return true;
    }
    let table = printable::NON_PRINTABLE;
    // The first range starting after `cp`; `cp` is non-printable iff the range before it holds it.
    let i = table.partition_point(|&(lo, _)| lo <= cp);
    !(i > 0 && cp <= table[i - 1].1)
}

/// How Python prints a JSON number parsed by `json.loads`.
enum PyNumber {
    /// A Python `int`, as its canonical decimal text.
    Int(String),
    /// A Python `float`.
    Float(f64),
}

fn py_number(n: &Number) -> PyNumber {
    let text = n.to_string();
    if text.contains(['.', 'e', 'E']) {
        // An out-of-range literal parses to ±inf, like Python's `float()`.
        PyNumber::Float(text.parse().unwrap_or(f64::NAN))
    } else {
        // JSON forbids leading zeros, so the only non-canonical integer literal is `-0`.
        let magnitude = text.strip_prefix('-').unwrap_or(&text);
        if magnitude.bytes().all(|b| b == b'0') {
            PyNumber::Int("0".to_owned())
        } else {
            PyNumber::Int(text)
        }
    }
}

fn write_repr(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => match py_number(n) {
            PyNumber::Int(text) => out.push_str(&text),
            PyNumber::Float(f) => out.push_str(&py_float_repr(f)),
        },
        Value::String(s) => write_repr_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, value)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr_str(out, key);
                out.push_str(": ");
                write_repr(out, value);
            }
            out.push('}');
        }
    }
}

/// CPython's `unicode_repr`.
fn write_repr_str(out: &mut String, s: &str) {
    // Single quotes, unless the text holds a single quote and no double quote.
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if is_printable(c) => out.push(c),
            c => {
                let cp = u32::from(c);
                let _ = if cp <= 0xff {
                    write!(out, "\\x{cp:02x}")
                } else if cp <= 0xffff {
                    write!(out, "\\u{cp:04x}")
                } else {
                    write!(out, "\\U{cp:08x}")
                };
            }
        }
    }
    out.push(quote);
}

fn write_json(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => match py_number(n) {
            PyNumber::Int(text) => out.push_str(&text),
            // `json.dumps` writes non-finite floats as these JavaScript names (allow_nan=True).
            PyNumber::Float(f) if f.is_nan() => out.push_str("NaN"),
            PyNumber::Float(f) if f.is_infinite() => {
                out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
            }
            PyNumber::Float(f) => out.push_str(&py_float_repr(f)),
        },
        Value::String(s) => write_json_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, value)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json_str(out, key);
                out.push_str(": ");
                write_json(out, value);
            }
            out.push('}');
        }
    }
}

/// Python's `json.encoder.py_encode_basestring_ascii`.
fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            // Everything outside ' '..='~' is escaped, DEL (0x7f) included.
            ' '..='~' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn floats_like_python() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (0.1, "0.1"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e16, "1.2345e+16"),
            (1e22, "1e+22"),
            (-1.2345e300, "-1.2345e+300"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (123456789.125, "123456789.125"),
            (f64::INFINITY, "inf"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float_repr(f), want, "{f:?}");
        }
    }

    #[test]
    fn numbers_keep_python_types() {
        assert_eq!(py_repr(&parse("-0")), "0");
        assert_eq!(py_repr(&parse("-0.0")), "-0.0");
        assert_eq!(py_repr(&parse("1E2")), "100.0");
        assert_eq!(py_repr(&parse("1e-400")), "0.0");
        let big = format!("-{}", "9".repeat(100));
        assert_eq!(py_repr(&parse(&big)), big);
        assert_eq!(
            json_dumps(&parse("[1e400, -1e400]")),
            "[Infinity, -Infinity]"
        );
        assert_eq!(py_repr(&json!(2.5)), "2.5");
    }

    #[test]
    fn repr_quoting_and_escapes() {
        assert_eq!(py_repr_str("plain"), "'plain'");
        assert_eq!(py_repr_str("it's"), "\"it's\"");
        assert_eq!(py_repr_str("it's \"x\""), "'it\\'s \"x\"'");
        assert_eq!(py_repr_str("say \"hi\""), "'say \"hi\"'");
        assert_eq!(
            py_repr_str("a\\b\t\n\r\0\x7f"),
            "'a\\\\b\\t\\n\\r\\x00\\x7f'"
        );
        assert_eq!(
            py_repr_str("\u{a0}\u{ad}\u{200d}\u{2028}"),
            "'\\xa0\\xad\\u200d\\u2028'"
        );
        assert_eq!(py_repr_str("日本 🚀 é"), "'日本 🚀 é'");
        assert_eq!(py_repr_str("\u{e000}\u{10ffff}"), "'\\ue000\\U0010ffff'");
        assert_eq!(
            py_repr(&parse(r#"{"a": [true, false, null], "b": {}, "c": []}"#)),
            "{'a': [True, False, None], 'b': {}, 'c': []}"
        );
        assert_eq!(py_str(&json!("x'y")), "x'y");
    }

    #[test]
    fn dumps_escapes() {
        assert_eq!(
            json_dumps(&json!("\"\\\n\r\t\u{8}\u{c}\u{1}\u{7f}é🚀")),
            r#""\"\\\n\r\t\b\f\u0001\u007f\u00e9\ud83d\ude80""#
        );
        assert_eq!(
            json_dumps(&parse(r#"{"a":[1,2.0,true,null],"b":{}}"#)),
            r#"{"a": [1, 2.0, true, null], "b": {}}"#
        );
    }

    #[test]
    fn printable_table_is_sorted_and_disjoint() {
        let table = printable::NON_PRINTABLE;
        assert!(table.windows(2).all(|w| w[0].1 + 1 < w[1].0));
        assert!(table.iter().all(|(lo, hi)| lo <= hi));
        assert!(!is_printable('\u{0}') && !is_printable('\u{85}') && !is_printable('\u{3000}'));
        assert!(is_printable(' ') && is_printable('~') && is_printable('\u{a1}'));
    }

    /// One line of `tests/data/pyformat-golden.jsonl`, written by CPython 3.11 with
    /// `scripts/gen_pyformat_golden.py`.
    #[test]
    fn golden_against_cpython() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/data/pyformat-golden.jsonl"
        );
        let data = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut count = 0;
        for (n, line) in data.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            let case: Value = serde_json::from_str(line).unwrap();
            let input = case["input"].as_str().unwrap();
            let value: Value = serde_json::from_str(input)
                .unwrap_or_else(|e| panic!("line {}: {input:?} does not parse: {e}", n + 1));
            assert_eq!(
                py_str(&value),
                case["str"].as_str().unwrap(),
                "line {}: {input}",
                n + 1
            );
            assert_eq!(
                json_dumps(&value),
                case["dumps"].as_str().unwrap(),
                "line {}: {input}",
                n + 1
            );
            count += 1;
        }
        assert!(count >= 1000, "only {count} golden cases");
    }
}
