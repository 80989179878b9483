//! Statements too large to parse on the data path. sqlparser's time and memory grow
//! with the text (a generated multi-megabyte INSERT builds an AST many times its size,
//! on the one event loop every client shares), while what the router needs from such
//! a text is little: a large statement is large because of its data, and goes to the
//! primary, which can run anything. A lexical scan finds where each statement starts
//! (outside strings, quoted names, dollar quotes and comments) and reads its first
//! keyword: one that changes session state the proxy would otherwise carry to other
//! servers (SET, PREPARE, LISTEN, a temporary table...) pins the client to that
//! primary connection instead, which keeps the state where it was made.

use super::decision::{Decision, PinReason};

/// Statement texts longer than this are routed by `decide`, without a full parse.
pub const LARGE_STATEMENT: usize = 256 * 1024;

/// First keywords of statements whose session effects the proxy would have to track.
const SESSION_KEYWORDS: &[&[u8]] = &[
    b"set",
    b"reset",
    b"discard",
    b"deallocate",
    b"prepare",
    b"listen",
    b"unlisten",
    b"load",
    b"declare",
];

/// The decision for a large statement text: the primary, pinned when a statement in
/// it changes session state.
pub fn decide(sql: &[u8]) -> Decision {
    let mut decision = Decision::primary();
    if statement_starts(sql).any(|start| changes_session(&sql[start..])) {
        decision.pin = Some(PinReason::LargeStatement);
    }
    decision
}

/// Whether the statement at the front of `sql` changes session state.
fn changes_session(sql: &[u8]) -> bool {
    let (first, rest) = keyword(sql);
    if SESSION_KEYWORDS
        .iter()
        .any(|k| first.eq_ignore_ascii_case(k))
    {
        return true;
    }
    if first.eq_ignore_ascii_case(b"create") {
        // CREATE [GLOBAL | LOCAL] TEMP[ORARY] ...
        let (mut second, rest) = keyword(rest);
        if second.eq_ignore_ascii_case(b"global") || second.eq_ignore_ascii_case(b"local") {
            second = keyword(rest).0;
        }
        return second.eq_ignore_ascii_case(b"temp") || second.eq_ignore_ascii_case(b"temporary");
    }
    false
}

/// The leading keyword of `sql` (after blanks and comments) and the text after it.
fn keyword(sql: &[u8]) -> (&[u8], &[u8]) {
    let start = skip_blanks(sql, 0);
    let len = sql[start..]
        .iter()
        .take_while(|b| b.is_ascii_alphabetic() || **b == b'_')
        .count();
    (&sql[start..start + len], &sql[start + len..])
}

/// The index of the first byte at or after `i` that is not blank or in a comment.
fn skip_blanks(sql: &[u8], mut i: usize) -> usize {
    loop {
        while i < sql.len() && sql[i].is_ascii_whitespace() {
            i += 1;
        }
        match comment_end(sql, i) {
            Some(end) => i = end,
            None => return i,
        }
    }
}

/// Where a comment starting at `i` ends (past its last byte), if one starts there.
fn comment_end(sql: &[u8], i: usize) -> Option<usize> {
    match (sql.get(i), sql.get(i + 1)) {
        (Some(b'-'), Some(b'-')) => Some(
            sql[i..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(sql.len(), |p| i + p + 1),
        ),
        (Some(b'/'), Some(b'*')) => {
            // Block comments nest in PostgreSQL.
            let mut depth = 0usize;
            let mut j = i;
            while j < sql.len() {
                match (sql[j], sql.get(j + 1)) {
                    (b'/', Some(b'*')) => {
                        depth += 1;
                        j += 2;
                    }
                    (b'*', Some(b'/')) => {
                        depth -= 1;
                        j += 2;
                        if depth == 0 {
                            return Some(j);
                        }
                    }
                    _ => j += 1,
                }
            }
            Some(sql.len())
        }
        _ => None,
    }
}

/// Where each statement of `sql` begins: at 0, and after every `;` outside strings,
/// quoted names, dollar quotes and comments.
fn statement_starts(sql: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut i = 0;
    let mut first = true;
    std::iter::from_fn(move || {
        if first {
            first = false;
            return Some(0);
        }
        while i < sql.len() {
            if let Some(end) = comment_end(sql, i) {
                i = end;
                continue;
            }
            match sql[i] {
                b';' => {
                    i += 1;
                    return Some(i);
                }
                b'\'' => i = string_end(sql, i),
                b'"' => {
                    i += 1;
                    while i < sql.len() && sql[i] != b'"' {
                        i += 1;
                    }
                    i += 1;
                }
                b'$' => i = dollar_end(sql, i),
                _ => i += 1,
            }
        }
        None
    })
}

/// Past the end of the string literal starting at `i` (a quote).
fn string_end(sql: &[u8], i: usize) -> usize {
    let escapes = i > 0
        && matches!(sql[i - 1], b'e' | b'E')
        && !sql
            .get(i.wrapping_sub(2))
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    let mut j = i + 1;
    while j < sql.len() {
        match sql[j] {
            b'\\' if escapes => j += 2,
            b'\'' if sql.get(j + 1) == Some(&b'\'') => j += 2,
            b'\'' => return j + 1,
            _ => j += 1,
        }
    }
    sql.len()
}

/// Past the end of a dollar-quoted string starting at `i`, or just past the `$` when
/// it starts none (a parameter `$1`, or `$` inside a name).
fn dollar_end(sql: &[u8], i: usize) -> usize {
    let preceded_by_name = i > 0 && (sql[i - 1].is_ascii_alphanumeric() || sql[i - 1] == b'_');
    let tag_len = sql[i + 1..]
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
        .count();
    let close = i + 1 + tag_len;
    if preceded_by_name
        || sql.get(close) != Some(&b'$')
        || sql.get(i + 1).is_some_and(|b| b.is_ascii_digit())
    {
        return i + 1;
    }
    let tag = &sql[i..=close];
    match sql[close + 1..].windows(tag.len()).position(|w| w == tag) {
        Some(p) => close + 1 + p + tag.len(),
        None => sql.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(sql: &str) -> bool {
        decide(sql.as_bytes()).pin.is_some()
    }

    #[test]
    fn data_statements_go_to_the_primary_unpinned() {
        let d = decide(b"INSERT INTO t VALUES (1), (2)");
        assert_eq!(d.route, super::super::Route::Primary);
        assert!(d.pin.is_none());
        assert!(!pinned(
            "select 1; update t set x = 1; with a as (select 1) select * from a"
        ));
        assert!(!pinned("CREATE TABLE t (x int); COPY t FROM STDIN"));
    }

    #[test]
    fn statements_that_change_the_session_pin_wherever_they_are() {
        for sql in [
            "SET search_path = x",
            "  /* a */ -- b\n set work_mem = '1GB'",
            "INSERT INTO t VALUES ('a;b'); SET x = 1",
            "select 1;PREPARE p AS SELECT 1",
            "insert into t values (1);\n create temporary table x (y int)",
            "CREATE GLOBAL TEMP TABLE x (y int)",
            "LISTEN ch",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "select 1; /* nested /* comment; */ still */ discard all",
        ] {
            assert!(pinned(sql), "{sql}");
        }
    }

    #[test]
    fn semicolons_inside_literals_names_and_comments_start_nothing() {
        for sql in [
            "INSERT INTO t VALUES ('; set x = 1')",
            "INSERT INTO t VALUES (E'\\'; set x = 1')",
            "INSERT INTO \"a; set x\" VALUES (1)",
            "INSERT INTO t VALUES ($$; set x = 1$$), ($q$ $$; set $q$)",
            "INSERT INTO t VALUES (1) -- ; set x = 1",
            "INSERT INTO t VALUES (1) /* ; set x /* ; */ = 1 */",
            "select $1; ",
        ] {
            assert!(!pinned(sql), "{sql}");
        }
    }

    #[test]
    fn unterminated_input_is_harmless() {
        for sql in ["'", "\"", "$a$", "/*", "--", "E'\\", "$", "set", ";;;"] {
            let _ = decide(sql.as_bytes());
        }
        assert!(pinned(";;;set x = 1"));
    }

    #[test]
    fn the_scan_is_linear() {
        // A text that is one long string literal, and one of many short statements.
        let mut text = b"INSERT INTO t VALUES ('".to_vec();
        text.resize(8 << 20, b'x');
        text.extend_from_slice(b"'); SET x = 1");
        assert!(decide(&text).pin.is_some());
        let many = "INSERT INTO t VALUES (1);".repeat(300_000);
        assert!(decide(many.as_bytes()).pin.is_none());
    }
}
