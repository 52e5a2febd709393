//! A policy's `date`, as EdgeLake writes it (`2026-07-20T18:40:12.114402Z`) and as the `ledger`
//! table stores it.
//!
//! The form every completed policy has is written and read field by field, not with chrono's
//! format strings, which chrono parses again at every call: at 64 clients, formatting and then
//! reading back every insert's date was ~2.5% of the master's CPU (perf, issue 16). Anything else
//! goes to chrono with the formats below, which read and write that form the same way.

use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc};

/// How EdgeLake writes a policy `date`: `%Y-%m-%dT%H:%M:%S.%fZ` in UTC, with microseconds.
const WRITTEN: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// The forms [`parse_date`] reads, once a trailing `Z` is removed.
const READ: [&str; 2] = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"];

/// The current time as EdgeLake writes a policy `date`: `%Y-%m-%dT%H:%M:%S.%fZ` in UTC, with
/// microseconds, e.g. `2026-07-20T18:40:12.114402Z`.
pub fn format_date(now: DateTime<Utc>) -> String {
    // A leap second (nanoseconds past 1e9) or a year that is not four digits goes to chrono,
    // which writes them its own way.
    let (year, nanos) = (now.year(), now.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return now.format(WRITTEN).to_string();
    }
    format!(
        "{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.month(),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        nanos / 1000
    )
}

/// A policy `date` as a time: EdgeLake's own form ([`format_date`]), or the same with fewer
/// fraction digits, without the `Z`, or with a space instead of the `T`. `None` for any other
/// text: such a date is kept in the policy, and the `ledger` table gets the insert time.
pub fn parse_date(date: &str) -> Option<NaiveDateTime> {
    let date = date.strip_suffix('Z').unwrap_or(date);
    parse_edgelake_date(date).or_else(|| {
        READ.iter()
            .find_map(|format| NaiveDateTime::parse_from_str(date, format).ok())
    })
}

/// `YYYY-MM-DDTHH:MM:SS.ffffff` (or with a space for the `T`), read field by field. `None` for
/// anything else, leap seconds included: [`parse_date`] then asks chrono.
fn parse_edgelake_date(date: &str) -> Option<NaiveDateTime> {
    let b = date.as_bytes();
    if b.len() != 26
        || [(4, b'-'), (7, b'-'), (13, b':'), (16, b':'), (19, b'.')]
            .iter()
            .any(|&(i, c)| b[i] != c)
        || !matches!(b[10], b'T' | b' ')
    {
        return None;
    }
    let number = |from: usize, to: usize| {
        b[from..to].iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    chrono::NaiveDate::from_ymd_opt(number(0, 4)? as i32, number(5, 7)?, number(8, 10)?)?
        .and_hms_micro_opt(
            number(11, 13)?,
            number(14, 16)?,
            number(17, 19)?,
            number(20, 26)?,
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 7, 20, 18, 40, 12).unwrap()
            + chrono::Duration::microseconds(114_402)
    }

    #[test]
    fn dates_read_as_times() {
        let at = |s: &str| parse_date(s).map(|d| d.to_string());
        assert_eq!(
            at("2026-07-20T18:40:12.114402Z").as_deref(),
            Some("2026-07-20 18:40:12.114402")
        );
        assert_eq!(
            at("2026-07-20 18:40:12").as_deref(),
            Some("2026-07-20 18:40:12")
        );
        assert_eq!(
            at("2026-07-20T18:40:12.5").as_deref(),
            Some("2026-07-20 18:40:12.500")
        );
        assert_eq!(at(&format_date(now())), Some(now().naive_utc().to_string()));
        for bad in ["", "d0", "2026-13-01T00:00:00Z", "yesterday", "2026-07-20"] {
            assert_eq!(at(bad), None, "{bad}");
        }
    }

    /// The hand-written date formatting and reading give exactly what chrono's formats give,
    /// over dates spread across the four-digit years and every field's edges.
    #[test]
    fn dates_are_written_and_read_as_chrono_does() {
        let chrono_format = |t: DateTime<Utc>| t.format(WRITTEN).to_string();
        let chrono_parse = |d: &str| {
            let d = d.strip_suffix('Z').unwrap_or(d);
            READ.iter()
                .find_map(|f| NaiveDateTime::parse_from_str(d, f).ok())
        };
        let mut times = vec![
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap()
                + chrono::Duration::nanoseconds(999_999_999),
            Utc.with_ymd_and_hms(2024, 2, 29, 12, 0, 0).unwrap(),
            now(),
        ];
        // A fixed pseudo-random walk over the years 0..10000, to the nanosecond.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = (x % 315_537_897_600) as i64 - 62_167_219_200;
            let nanos = ((x >> 20) % 1_000_000_000) as u32;
            times.push(DateTime::from_timestamp(secs, nanos).unwrap());
        }
        for t in times {
            let text = format_date(t);
            assert_eq!(text, chrono_format(t), "{t:?}");
            assert_eq!(parse_date(&text), chrono_parse(&text), "{text}");
            let spaced = text.replacen('T', " ", 1);
            assert_eq!(parse_date(&spaced), chrono_parse(&spaced), "{spaced}");
            assert!(parse_date(&text).is_some(), "{text}");
        }
        for odd in [
            "2026-02-30T10:00:00.000000Z",
            "2026-12-02T24:00:00.000000Z",
            "2026-12-02T23:59:60.000000Z",
            "2026-12-02T23:59:60.5Z",
            "2026-13-02T10:00:00.000000",
            "2026-12-02X10:00:00.000000",
            "2026-12-02T10:00:00,000000",
            "2026-12-02T10:00:0a.000000",
            "+2026-12-02T10:00:00.00000",
            "2026-12-02T10:00:00.123",
            "2026-12-02 10:00:00",
            "",
        ] {
            assert_eq!(parse_date(odd), chrono_parse(odd), "{odd}");
        }
    }

    #[test]
    fn format_date_has_microseconds() {
        assert_eq!(format_date(now()), "2026-07-20T18:40:12.114402Z");
        let whole = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(format_date(whole), "2026-01-02T03:04:05.000000Z");
    }
}
