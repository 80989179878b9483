//! Transaction starts the proxy answers itself.
//!
//! A client's `BEGIN` (simple protocol, outside a transaction, no server held) is
//! answered by the proxy at once and sent to a server only with the transaction's first
//! statement: one round trip to Postgres less per transaction, and no pooled connection
//! held while the client prepares that statement. A `COMMIT` or `ROLLBACK` that follows
//! such a `BEGIN` directly needs no server at all.
//!
//! Only texts that cannot fail on any server are answered this way: the proxy has told
//! the client the transaction started, so the `BEGIN` it sends later must not be
//! refused. That excludes `READ WRITE` and `SERIALIZABLE`, which a hot standby refuses,
//! and anything with comments, quotes or other statements, which go to a server as
//! before.

use bytes::BytesMut;

use crate::protocol::frontend::{Frontend, Target};
use crate::protocol::messages as msg;

/// A unit that runs one statement without parameters and ends with ReadyForQuery: a
/// simple query, or the extended protocol's Parse, Bind, optional Describe, Execute and
/// Sync on the unnamed statement and portal (what a driver sends for `BEGIN`).
pub struct Lone<'a> {
    pub sql: &'a [u8],
    /// None for a simple query; for the extended protocol, the Describe's kind
    /// (`S`, `P`) or 0 without one.
    pub extended: Option<u8>,
}

fn decoded(frame: &BytesMut) -> Option<Frontend<'_>> {
    Frontend::decode(frame).ok()
}

pub fn lone_statement(unit: &[BytesMut]) -> Option<Lone<'_>> {
    match unit {
        [query] => match decoded(query)? {
            Frontend::Query { sql } => Some(Lone {
                sql,
                extended: None,
            }),
            _ => None,
        },
        [parse, bind, rest @ ..] => {
            let (Frontend::Parse(parse), Frontend::Bind(bind)) = (decoded(parse)?, decoded(bind)?)
            else {
                return None;
            };
            let (describe, execute, sync) = match rest {
                [describe, execute, sync] => match decoded(describe)? {
                    Frontend::Describe { target, name: "" } => match target {
                        Target::Statement => (b'S', execute, sync),
                        Target::Portal => (b'P', execute, sync),
                        Target::Unknown(_) => return None,
                    },
                    _ => return None,
                },
                [execute, sync] => (0, execute, sync),
                _ => return None,
            };
            if decoded(execute)? != (Frontend::Execute { portal: b"" })
                || decoded(sync)? != Frontend::Sync
                || !parse.name.is_empty()
                // No parameter types, and a Bind of the unnamed statement without values.
                || !parse.declares_no_types()
                || !bind.portal.is_empty()
                || !bind.statement.is_empty()
                || !bind.binds_no_values()
            {
                return None;
            }
            Some(Lone {
                sql: parse.sql,
                extended: Some(describe),
            })
        }
        _ => None,
    }
}

/// Writes what the server would answer to a lone statement (`extended` as in `Lone`)
/// that returns no rows and completes with `tag`, then ReadyForQuery with `status`.
pub fn answer(out: &mut BytesMut, extended: Option<u8>, tag: &str, status: msg::TxStatus) {
    if let Some(describe) = extended {
        msg::empty_message(out, msg::PARSE_COMPLETE);
        msg::empty_message(out, msg::BIND_COMPLETE);
        if describe == b'S' {
            msg::no_parameters(out);
        }
        if describe != 0 {
            msg::empty_message(out, msg::NO_DATA);
        }
    }
    msg::command_complete(out, tag);
    msg::ready_for_query(out, status);
}

/// What ends a transaction that never reached a server, and the tag Postgres reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalEnd {
    Commit,
    Rollback,
}

impl LocalEnd {
    pub fn tag(self) -> &'static str {
        match self {
            LocalEnd::Commit => "COMMIT",
            LocalEnd::Rollback => "ROLLBACK",
        }
    }
}

/// The command tag of a transaction start the proxy may answer itself (`BEGIN` or
/// `START TRANSACTION`), or None when the server must see the text first.
pub fn deferrable_begin(sql: &[u8]) -> Option<&'static str> {
    let words = words(sql)?;
    let mut rest = words.as_slice();
    let tag = match rest {
        [first, more @ ..] if first.eq_ignore_ascii_case(b"begin") => {
            rest = more;
            if let [w, more @ ..] = rest
                && (w.eq_ignore_ascii_case(b"work") || w.eq_ignore_ascii_case(b"transaction"))
            {
                rest = more;
            }
            "BEGIN"
        }
        [first, second, more @ ..]
            if first.eq_ignore_ascii_case(b"start")
                && second.eq_ignore_ascii_case(b"transaction") =>
        {
            rest = more;
            "START TRANSACTION"
        }
        _ => return None,
    };
    safe_modes(rest).then_some(tag)
}

/// A plain `COMMIT`/`END` or `ROLLBACK`/`ABORT` (optionally `WORK`/`TRANSACTION`).
pub fn plain_end(sql: &[u8]) -> Option<LocalEnd> {
    let words = words(sql)?;
    let (first, rest) = words.split_first()?;
    let end = if first.eq_ignore_ascii_case(b"commit") || first.eq_ignore_ascii_case(b"end") {
        LocalEnd::Commit
    } else if first.eq_ignore_ascii_case(b"rollback") || first.eq_ignore_ascii_case(b"abort") {
        LocalEnd::Rollback
    } else {
        return None;
    };
    match rest {
        [] => Some(end),
        [w] if w.eq_ignore_ascii_case(b"work") || w.eq_ignore_ascii_case(b"transaction") => {
            Some(end)
        }
        _ => None,
    }
}

/// Transaction modes that every server accepts: `ISOLATION LEVEL` other than
/// `SERIALIZABLE`, `READ ONLY`, `[NOT] DEFERRABLE`, separated by spaces or commas.
fn safe_modes(mut words: &[&[u8]]) -> bool {
    let is = |w: &[u8], k: &str| w.eq_ignore_ascii_case(k.as_bytes());
    let mut after_mode = false;
    while let Some((first, rest)) = words.split_first() {
        if is(first, ",") {
            if !after_mode || rest.is_empty() {
                return false;
            }
            after_mode = false;
            words = rest;
            continue;
        }
        words = match words {
            [i, l, r, c, more @ ..]
                if is(i, "isolation")
                    && is(l, "level")
                    && is(r, "read")
                    && (is(c, "committed") || is(c, "uncommitted")) =>
            {
                more
            }
            [i, l, r, rd, more @ ..]
                if is(i, "isolation")
                    && is(l, "level")
                    && is(r, "repeatable")
                    && is(rd, "read") =>
            {
                more
            }
            [r, o, more @ ..] if is(r, "read") && is(o, "only") => more,
            [d, more @ ..] if is(d, "deferrable") => more,
            [n, d, more @ ..] if is(n, "not") && is(d, "deferrable") => more,
            _ => return false,
        };
        after_mode = true;
    }
    true
}

/// The text split into words (letters only) and commas, with one optional trailing
/// semicolon; None if it holds anything else.
fn words(sql: &[u8]) -> Option<Vec<&[u8]>> {
    let mut text = sql.trim_ascii();
    if let Some(stripped) = text.strip_suffix(b";") {
        text = stripped.trim_ascii_end();
    }
    let mut words = Vec::with_capacity(4);
    let mut start = None;
    for (i, &b) in text.iter().enumerate() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' => {
                start.get_or_insert(i);
            }
            b' ' | b'\t' | b'\n' | b'\r' | b',' => {
                if let Some(s) = start.take() {
                    words.push(&text[s..i]);
                }
                if b == b',' {
                    words.push(&text[i..=i]);
                }
            }
            _ => return None,
        }
    }
    if let Some(s) = start {
        words.push(&text[s..]);
    }
    (!words.is_empty()).then_some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_starts_that_cannot_fail_are_recognised_with_their_tag() {
        for (sql, tag) in [
            ("BEGIN", "BEGIN"),
            ("begin;", "BEGIN"),
            ("  Begin Work ;\n", "BEGIN"),
            ("BEGIN TRANSACTION", "BEGIN"),
            ("START TRANSACTION", "START TRANSACTION"),
            ("BEGIN READ ONLY", "BEGIN"),
            ("BEGIN ISOLATION LEVEL REPEATABLE READ", "BEGIN"),
            ("begin isolation level read committed, read only", "BEGIN"),
            (
                "START TRANSACTION READ ONLY NOT DEFERRABLE",
                "START TRANSACTION",
            ),
            ("BEGIN ISOLATION LEVEL READ UNCOMMITTED DEFERRABLE", "BEGIN"),
        ] {
            assert_eq!(deferrable_begin(sql.as_bytes()), Some(tag), "{sql}");
        }
    }

    #[test]
    fn starts_a_server_may_refuse_or_that_say_more_go_to_the_server() {
        for sql in [
            "BEGIN READ WRITE",
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "BEGIN; SELECT 1",
            "BEGIN /* replicator: replica */",
            "-- c\nBEGIN",
            "BEGIN;;",
            "BEGIN WORK WORK",
            "BEGIN READ",
            "BEGIN , READ ONLY",
            "BEGIN READ ONLY,",
            "BEGIN READ ONLY,, DEFERRABLE",
            "START",
            "BEGINS",
            "SAVEPOINT a",
            "",
            ";",
        ] {
            assert_eq!(deferrable_begin(sql.as_bytes()), None, "{sql:?}");
        }
    }

    #[test]
    fn plain_ends_are_recognised_and_the_rest_left_to_the_server() {
        assert_eq!(plain_end(b"COMMIT"), Some(LocalEnd::Commit));
        assert_eq!(plain_end(b"end transaction;"), Some(LocalEnd::Commit));
        assert_eq!(plain_end(b"ROLLBACK"), Some(LocalEnd::Rollback));
        assert_eq!(plain_end(b"abort work"), Some(LocalEnd::Rollback));
        for sql in [
            "COMMIT AND CHAIN",
            "ROLLBACK TO SAVEPOINT a",
            "ROLLBACK TO a",
            "COMMIT PREPARED 'x'",
            "COMMIT; BEGIN",
            "COMMITS",
        ] {
            assert_eq!(plain_end(sql.as_bytes()), None, "{sql}");
        }
    }
}
