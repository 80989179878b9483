//! PostgreSQL values in text form (as pgoutput and a text-mode snapshot give them) to
//! their natural BSON types. The source sessions run with `DateStyle=ISO`,
//! `TimeZone=UTC`, `bytea_output=hex` and `extra_float_digits=3`, so the text forms
//! parsed here are fixed. A value that does not parse is kept as a string rather than
//! dropped: nothing the source holds is lost on the way.

use std::str::FromStr;

use mongodb::bson::{Binary, Bson, DateTime, Decimal128, spec::BinarySubtype};

/// How a column's values are converted. Domains are resolved to their base type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int32,
    Int64,
    Float,
    Numeric,
    Json,
    Bytea,
    Uuid,
    Timestamp,
    TimestampTz,
    Date,
    /// Text and every type without a closer BSON match (time, interval, inet, enums...).
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnType {
    pub kind: Kind,
    /// Set for arrays: the kind of their elements.
    pub array: bool,
}

/// The kind of a built-in scalar type by OID; anything else converts as text.
pub fn kind_of(oid: u32) -> Kind {
    match oid {
        16 => Kind::Bool,
        17 => Kind::Bytea,
        21 | 23 => Kind::Int32,
        20 | 26 | 28 => Kind::Int64, // int8, oid, xid
        700 | 701 => Kind::Float,
        1700 => Kind::Numeric,
        114 | 3802 => Kind::Json,
        2950 => Kind::Uuid,
        1114 => Kind::Timestamp,
        1184 => Kind::TimestampTz,
        1082 => Kind::Date,
        _ => Kind::Text,
    }
}

pub fn to_bson(text: &str, ty: ColumnType) -> Bson {
    if ty.array {
        return match parse_array(text) {
            Some(items) => array_to_bson(items, ty.kind),
            None => Bson::String(text.to_string()),
        };
    }
    scalar_to_bson(text, ty.kind)
}

fn scalar_to_bson(text: &str, kind: Kind) -> Bson {
    let fallback = || Bson::String(text.to_string());
    match kind {
        Kind::Bool => match text {
            "t" | "true" => Bson::Boolean(true),
            "f" | "false" => Bson::Boolean(false),
            _ => fallback(),
        },
        Kind::Int32 => text.parse().map(Bson::Int32).unwrap_or_else(|_| fallback()),
        Kind::Int64 => text.parse().map(Bson::Int64).unwrap_or_else(|_| fallback()),
        Kind::Float => text
            .parse()
            .map(Bson::Double)
            .unwrap_or_else(|_| fallback()),
        Kind::Numeric => Decimal128::from_str(text)
            .map(Bson::Decimal128)
            .unwrap_or_else(|_| fallback()),
        Kind::Json => serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| Bson::try_from(v).ok())
            .unwrap_or_else(fallback),
        Kind::Bytea => decode_hex(text.strip_prefix("\\x").unwrap_or(text))
            .map(|bytes| {
                Bson::Binary(Binary {
                    subtype: BinarySubtype::Generic,
                    bytes,
                })
            })
            .unwrap_or_else(fallback),
        Kind::Uuid => decode_hex(&text.replace('-', ""))
            .filter(|b| b.len() == 16)
            .map(|bytes| {
                Bson::Binary(Binary {
                    subtype: BinarySubtype::Uuid,
                    bytes,
                })
            })
            .unwrap_or_else(fallback),
        Kind::Timestamp | Kind::TimestampTz => parse_timestamp(text)
            .map(Bson::DateTime)
            .unwrap_or_else(fallback),
        Kind::Date => parse_timestamp(&format!("{text} 00:00:00"))
            .map(Bson::DateTime)
            .unwrap_or_else(fallback),
        Kind::Text => fallback(),
    }
}

/// `2024-05-06 07:08:09.123456[+hh[:mm[:ss]]]`, `infinity`, `-infinity`. BSON dates
/// keep milliseconds; finer digits are truncated. Years BC stay strings.
fn parse_timestamp(text: &str) -> Option<DateTime> {
    match text {
        "infinity" => return Some(DateTime::MAX),
        "-infinity" => return Some(DateTime::MIN),
        _ => {}
    }
    if text.ends_with(" BC") || text.len() < 19 {
        return None;
    }
    // The offset starts at the first sign after the time of day (a text that is not
    // ASCII up to there is no timestamp).
    let (local, offset_secs) = match text.get(19..)?.find(['+', '-']) {
        Some(at) => {
            let at = at + 19;
            (&text[..at], parse_offset(&text[at..])?)
        }
        None => (text, 0),
    };
    let naive = chrono::NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    let ms = naive
        .and_utc()
        .timestamp_millis()
        .checked_sub(offset_secs.checked_mul(1000)?)?;
    Some(DateTime::from_millis(ms))
}

fn parse_offset(text: &str) -> Option<i64> {
    let sign = if text.starts_with('-') { -1 } else { 1 };
    let mut secs = 0i64;
    for (i, part) in text.get(1..)?.split(':').enumerate() {
        // Two digits at most, as Postgres prints them: no overflow below.
        if part.len() > 2 {
            return None;
        }
        let v: i64 = part.parse().ok()?;
        secs += v * [3600, 60, 1].get(i)?;
    }
    Some(sign * secs)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One element of a parsed array literal.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayItem {
    Null,
    Value(String),
    Nested(Vec<ArrayItem>),
}

fn array_to_bson(items: Vec<ArrayItem>, kind: Kind) -> Bson {
    Bson::Array(
        items
            .into_iter()
            .map(|item| match item {
                ArrayItem::Null => Bson::Null,
                ArrayItem::Value(v) => scalar_to_bson(&v, kind),
                ArrayItem::Nested(inner) => array_to_bson(inner, kind),
            })
            .collect(),
    )
}

/// Parses PostgreSQL's array output: `{1,2,NULL}`, `{{a,b},{c,"d e"}}`, with an
/// optional `[1:2]=` dimension prefix. `None` when the text is not an array.
pub fn parse_array(text: &str) -> Option<Vec<ArrayItem>> {
    let body = match text.find("={") {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let chars: Vec<char> = body.chars().collect();
    let mut pos = 0;
    let items = parse_level(&chars, &mut pos, 1)?;
    if chars[pos..].iter().all(|c| c.is_whitespace()) {
        Some(items)
    } else {
        None
    }
}

/// Postgres arrays have at most 6 dimensions (MAXDIM); deeper nesting is no array
/// output, and must not recurse without bound.
const MAX_ARRAY_DEPTH: usize = 6;

fn parse_level(chars: &[char], pos: &mut usize, depth: usize) -> Option<Vec<ArrayItem>> {
    if chars.get(*pos) != Some(&'{') || depth > MAX_ARRAY_DEPTH {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if chars.get(*pos) == Some(&'}') {
        *pos += 1;
        return Some(items);
    }
    loop {
        match chars.get(*pos)? {
            '{' => items.push(ArrayItem::Nested(parse_level(chars, pos, depth + 1)?)),
            '"' => {
                *pos += 1;
                let mut s = String::new();
                loop {
                    match chars.get(*pos)? {
                        '\\' => {
                            s.push(*chars.get(*pos + 1)?);
                            *pos += 2;
                        }
                        '"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            s.push(*c);
                            *pos += 1;
                        }
                    }
                }
                items.push(ArrayItem::Value(s));
            }
            _ => {
                let mut s = String::new();
                while let Some(&c) = chars.get(*pos) {
                    if c == ',' || c == '}' {
                        break;
                    }
                    if c == '\\' {
                        s.push(*chars.get(*pos + 1)?);
                        *pos += 2;
                    } else {
                        s.push(c);
                        *pos += 1;
                    }
                }
                let s = s.trim().to_string();
                items.push(if s.eq_ignore_ascii_case("NULL") {
                    ArrayItem::Null
                } else {
                    ArrayItem::Value(s)
                });
            }
        }
        match chars.get(*pos)? {
            ',' => *pos += 1,
            '}' => {
                *pos += 1;
                return Some(items);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn scalar(kind: Kind) -> ColumnType {
        ColumnType { kind, array: false }
    }

    #[test]
    fn scalars_take_their_natural_bson_types() {
        assert_eq!(to_bson("42", scalar(Kind::Int32)), Bson::Int32(42));
        assert_eq!(
            to_bson("9000000000", scalar(Kind::Int64)),
            Bson::Int64(9_000_000_000)
        );
        assert_eq!(to_bson("t", scalar(Kind::Bool)), Bson::Boolean(true));
        assert_eq!(to_bson("1.5", scalar(Kind::Float)), Bson::Double(1.5));
        assert_eq!(
            to_bson("12345.678901234567890", scalar(Kind::Numeric)),
            Bson::Decimal128(Decimal128::from_str("12345.678901234567890").unwrap())
        );
        assert_eq!(
            to_bson(r#"{"a":[1,{"b":null}]}"#, scalar(Kind::Json)),
            Bson::Document(doc! {"a": [1, {"b": Bson::Null}]})
        );
        assert_eq!(
            to_bson("\\x00ff", scalar(Kind::Bytea)),
            Bson::Binary(Binary {
                subtype: BinarySubtype::Generic,
                bytes: vec![0, 255]
            })
        );
        let Bson::Binary(uuid) =
            to_bson("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", scalar(Kind::Uuid))
        else {
            panic!("uuid is not binary")
        };
        assert_eq!(uuid.subtype, BinarySubtype::Uuid);
        assert_eq!(uuid.bytes[0], 0xa0);
        assert_eq!(
            to_bson("abc", scalar(Kind::Text)),
            Bson::String("abc".into())
        );
    }

    #[test]
    fn timestamps_become_dates() {
        let at = |s: &str, k| match to_bson(s, scalar(k)) {
            Bson::DateTime(d) => d.timestamp_millis(),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(at("1970-01-01 00:00:01.5", Kind::Timestamp), 1500);
        assert_eq!(at("1970-01-01 00:00:01.5+00", Kind::TimestampTz), 1500);
        assert_eq!(at("1970-01-01 02:00:00+02", Kind::TimestampTz), 0);
        assert_eq!(at("1969-12-31 23:30:00-00:30", Kind::TimestampTz), 0);
        assert_eq!(at("1970-01-02", Kind::Date), 86_400_000);
        assert_eq!(
            to_bson("0044-03-15 00:00:00 BC", scalar(Kind::Timestamp)),
            Bson::String("0044-03-15 00:00:00 BC".into())
        );
        // Found by the fuzzer: text that is not a timestamp stays a string, never a
        // panic (a character across byte 19, an offset too large to multiply).
        let deep = "{".repeat(100_000);
        assert!(
            parse_array(&deep).is_none(),
            "nesting beyond MAXDIM is no array"
        );
        assert!(parse_array("{{{{{{1}}}}}}").is_some());
        assert!(parse_array("{{{{{{{1}}}}}}}").is_none());
        for odd in [
            "1970-01-01 00:00:0é+01",
            "1970-01-01 00:00:00+99999999999999999",
            "1970-01-01 00:00:00+",
        ] {
            assert!(matches!(
                to_bson(odd, scalar(Kind::TimestampTz)),
                Bson::String(_)
            ));
        }
    }

    #[test]
    fn arrays_nest_and_keep_nulls_and_quotes() {
        let ints = ColumnType {
            kind: Kind::Int32,
            array: true,
        };
        assert_eq!(
            to_bson("{{1,2},{3,NULL}}", ints),
            Bson::Array(vec![
                Bson::Array(vec![Bson::Int32(1), Bson::Int32(2)]),
                Bson::Array(vec![Bson::Int32(3), Bson::Null]),
            ])
        );
        let texts = ColumnType {
            kind: Kind::Text,
            array: true,
        };
        assert_eq!(
            to_bson(r#"{plain,"with, comma","q\"uote",NULL,"NULL"}"#, texts),
            Bson::Array(vec![
                Bson::String("plain".into()),
                Bson::String("with, comma".into()),
                Bson::String("q\"uote".into()),
                Bson::Null,
                Bson::String("NULL".into()),
            ])
        );
        assert_eq!(to_bson("{}", ints), Bson::Array(vec![]));
        assert_eq!(
            to_bson("[0:1]={7,8}", ints),
            Bson::Array(vec![Bson::Int32(7), Bson::Int32(8)])
        );
        assert_eq!(to_bson("{1,2", ints), Bson::String("{1,2".into()));
    }
}
