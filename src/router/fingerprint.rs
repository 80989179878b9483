//! The shape of a statement: its text with literal values replaced by `?`.
//!
//! Applications that inline values (`WHERE id = 42`) send a new text for every
//! statement; keyed by exact text, the decision cache would miss every time and
//! sqlparser would run on the data path. Literals never change where a statement may
//! run, so the cache is keyed by shape. (Statements whose decision carries a value, such
//! as `SET x = 'v'`, are cached by exact text instead; see `cache.rs`.)

/// Bytes at which a literal, quoted identifier or comment may begin; everything else
/// is copied into the shape as it is. Statements are mostly keywords, names and
/// spaces, so the scan passes over runs of those eight bytes at a time
/// (`may_hold_special`), and over the rest with one table lookup per byte.
const SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut d = b'0';
    while d <= b'9' {
        t[d as usize] = true;
        d += 1;
    }
    t[b'\'' as usize] = true;
    t[b'"' as usize] = true;
    t[b'-' as usize] = true;
    t[b'/' as usize] = true;
    t[b'$' as usize] = true;
    t
};

/// Every byte of `SPECIAL` lies in this range (so do `#%&()*+,.`, which the byte loop
/// then passes over): text without any byte in it is copied as it is.
const SPECIAL_LOW: u64 = 0x22;
const SPECIAL_HIGH: u64 = 0x39;

/// Whether any of eight bytes (a little-endian word) lies in
/// `SPECIAL_LOW..=SPECIAL_HIGH`. Each byte is computed in its own lane (no carry or
/// borrow reaches the next byte), and a byte with its high bit set never counts, as
/// in `SPECIAL`: a word of keywords, names and spaces costs a few instructions instead
/// of eight lookups.
#[inline]
fn may_hold_special(word: u64) -> bool {
    const ONES: u64 = u64::MAX / 255;
    let low7 = word & (ONES * 0x7f);
    // Per byte b (high bit clear): bit 7 of the first term is set when b <= HIGH, of
    // the second when b >= LOW.
    let at_most_high = (ONES * (0x80 + SPECIAL_HIGH)).wrapping_sub(low7);
    let at_least_low = low7.wrapping_add(ONES * (0x80 - SPECIAL_LOW));
    at_most_high & at_least_low & !word & (ONES * 0x80) != 0
}

/// Writes the shape of `sql` into `out` (cleared first). Works on bytes: literals
/// begin and end at ASCII characters, so multi-byte UTF-8 (or bytes that are not
/// UTF-8 at all) pass through unchanged.
pub fn shape_into(sql: &[u8], out: &mut Vec<u8>) {
    shape_with::<true>(sql, out);
}

/// `shape_into`, with (`SKIP_WORDS`) or without the skip over words that hold no
/// special byte: both must give the same shape (the fuzz target compares them).
pub(crate) fn shape_with<const SKIP_WORDS: bool>(sql: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    let mut last_copied = 0;
    // Copies the untouched text before a literal, then the placeholder.
    let replace = |out: &mut Vec<u8>, start: usize, end: usize, last: &mut usize| {
        out.extend_from_slice(&sql[*last..start]);
        out.push(b'?');
        *last = end;
    };
    while i < sql.len() {
        if SKIP_WORDS {
            while let Some(word) = sql[i..].first_chunk::<8>()
                && !may_hold_special(u64::from_le_bytes(*word))
            {
                i += 8;
            }
        }
        let Some(&b) = sql.get(i) else { break };
        if !SPECIAL[b as usize] {
            i += 1;
            continue;
        }
        match b {
            b'\'' => {
                // Standard string: '' is an escaped quote. E'...' also allows \' escapes.
                let escapes = i > 0
                    && matches!(sql[i - 1], b'e' | b'E')
                    && !is_ident(sql.get(i.wrapping_sub(2)).copied());
                let start = i;
                i += 1;
                while i < sql.len() {
                    match sql[i] {
                        b'\\' if escapes => i += 2,
                        b'\'' if sql.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
                let end = i.min(sql.len());
                replace(out, start, end, &mut last_copied);
            }
            b'"' => {
                // Quoted identifier: part of the shape.
                i += 1;
                while i < sql.len() {
                    if sql[i] == b'"' {
                        if sql.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
            }
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                // Comments stay: routing hints live in them.
                i += 2;
                while i < sql.len() && !(sql[i] == b'*' && sql.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i = (i + 2).min(sql.len());
            }
            b'$' => {
                // $1 is a parameter (shape); $tag$...$tag$ is a string (literal).
                let start = i;
                let mut j = i + 1;
                while j < sql.len() && is_ident(Some(sql[j])) && !sql[j].is_ascii_digit() {
                    j += 1;
                }
                if j < sql.len() && sql[j] == b'$' {
                    let tag = &sql[start..=j];
                    match find(&sql[j + 1..], tag) {
                        Some(pos) => {
                            let end = j + 1 + pos + tag.len();
                            replace(out, start, end, &mut last_copied);
                            i = end;
                        }
                        None => i = sql.len(),
                    }
                } else {
                    i = j.max(i + 1);
                    while i < sql.len() && sql[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            b'0'..=b'9' if !is_ident(i.checked_sub(1).map(|p| sql[p])) => {
                let start = i;
                while i < sql.len()
                    && (sql[i].is_ascii_alphanumeric() || sql[i] == b'.' || sql[i] == b'_')
                {
                    // exponent sign: 1e-5
                    if matches!(sql[i], b'e' | b'E') && matches!(sql.get(i + 1), Some(b'+' | b'-'))
                    {
                        i += 1;
                    }
                    i += 1;
                }
                replace(out, start, i, &mut last_copied);
            }
            _ => i += 1,
        }
    }
    out.extend_from_slice(&sql[last_copied.min(sql.len())..]);
}

/// Position of `needle` in `haystack` (dollar-quote tags are short).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn is_ident(b: Option<u8>) -> bool {
    matches!(b, Some(b) if b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> String {
        let mut s = Vec::new();
        shape_into(sql.as_bytes(), &mut s);
        String::from_utf8(s).unwrap()
    }

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            shape("SELECT abalance FROM t WHERE aid = 42;"),
            "SELECT abalance FROM t WHERE aid = ?;"
        );
        assert_eq!(
            shape("SELECT 'it''s', E'a\\'b', 1.5e-3, x1, $1"),
            "SELECT ?, E?, ?, x1, $1"
        );
        assert_eq!(shape("SELECT $$ text $$, $f$ a $f$"), "SELECT ?, ?");
        assert_eq!(
            shape("/* replicator: primary */ SELECT 1"),
            "/* replicator: primary */ SELECT ?"
        );
        assert_eq!(
            shape("SELECT \"col 1\" FROM \"t\"\"x\""),
            "SELECT \"col 1\" FROM \"t\"\"x\""
        );
        assert_eq!(shape("SELECT 1 -- 2\n, 3"), "SELECT ? -- 2\n, ?");
        assert_eq!(
            shape("SELECT naïve, x2 FROM t_1 WHERE a = 'é' AND b = $x$ q $x$"),
            "SELECT naïve, x2 FROM t_1 WHERE a = ? AND b = ?"
        );
    }

    #[test]
    fn the_word_test_finds_every_byte_of_the_range_in_every_lane() {
        for value in 0..=255u8 {
            let in_range = (SPECIAL_LOW..=SPECIAL_HIGH).contains(&u64::from(value));
            assert!(!SPECIAL[value as usize] || in_range, "{value:#x}");
            for lane in 0..8 {
                // Neighbours at both ends of the byte range: no lane may borrow or
                // carry into the next.
                for fill in [b'a', 0x00, 0x21, 0x3a, 0x7f, 0x80, 0xff] {
                    let mut word = [fill; 8];
                    word[lane] = value;
                    let fill_in_range = (SPECIAL_LOW..=SPECIAL_HIGH).contains(&u64::from(fill));
                    assert_eq!(
                        may_hold_special(u64::from_le_bytes(word)),
                        in_range || fill_in_range,
                        "{value:#x} in lane {lane} among {fill:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn specials_are_found_at_every_offset_of_a_word() {
        for offset in 0..17 {
            let name = "x".repeat(offset);
            for (literal, shaped) in [
                ("'a1'", "?"),
                ("42", "?"),
                ("$$ s $$", "?"),
                ("-- 1\n", "-- 1\n"),
                ("/* 1 */", "/* 1 */"),
                ("\"q 1\"", "\"q 1\""),
            ] {
                let sql = format!("SELECT {name} {literal} abcdefghijklmnop");
                let want = format!("SELECT {name} {shaped} abcdefghijklmnop");
                assert_eq!(shape(&sql), want, "{sql:?}");
                let mut plain = Vec::new();
                shape_with::<false>(sql.as_bytes(), &mut plain);
                assert_eq!(plain, want.as_bytes());
            }
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_pass_through() {
        let mut out = Vec::new();
        shape_into(b"SELECT \xff FROM t WHERE a = '\xe9' AND b = 7", &mut out);
        assert_eq!(out, b"SELECT \xff FROM t WHERE a = ? AND b = ?");
    }

    #[test]
    fn unterminated_input_does_not_panic() {
        for sql in [
            "'abc",
            "$tag$ abc",
            "\"abc",
            "/* abc",
            "E'\\",
            "SELECT 1e",
            "é'x'",
        ] {
            shape(sql);
        }
    }
}
