//! Decoding of the `pgoutput` logical replication messages (protocol version 1), the
//! payload of each XLogData frame. Values stay in PostgreSQL's text form; converting
//! them is the sinks' business (see `values.rs`).

use std::fmt;

/// One column value of a tuple as pgoutput sends it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Datum {
    Null,
    /// A TOASTed value the update did not change: pgoutput omits it, and the target
    /// must keep what it has.
    Unchanged,
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    pub name: String,
    pub type_oid: u32,
    /// Part of the replica identity (the primary key, or every column with FULL).
    pub is_key: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// `d` default (primary key), `f` full, `i` index, `n` nothing.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin {
        /// Position of the commit record: the transaction's place in commit order.
        final_lsn: u64,
        /// Microseconds since 2000-01-01 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        /// End of the commit record: confirming this position acknowledges the
        /// transaction.
        end_lsn: u64,
        commit_time: i64,
    },
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Datum>,
    },
    Update {
        relation: u32,
        /// The old key (`K`) or the whole old row (`O`, REPLICA IDENTITY FULL), sent
        /// when the key changed or the identity is FULL.
        old: Option<Vec<Datum>>,
        new: Vec<Datum>,
    },
    Delete {
        relation: u32,
        old: Vec<Datum>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Type, Origin and logical messages: nothing to apply.
    Other(u8),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError(format!(
                "wanted {n} bytes, {} left",
                self.data.len()
            )));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError("unterminated string".into()))?;
        let s = String::from_utf8_lossy(&self.data[..end]).into_owned();
        self.data = &self.data[end + 1..];
        Ok(s)
    }
}

pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let mut c = Cursor { data };
    let tag = c.u8()?;
    Ok(match tag {
        b'B' => Message::Begin {
            final_lsn: c.u64()?,
            commit_time: c.i64()?,
            xid: c.u32()?,
        },
        b'C' => {
            let _flags = c.u8()?;
            Message::Commit {
                commit_lsn: c.u64()?,
                end_lsn: c.u64()?,
                commit_time: c.i64()?,
            }
        }
        b'R' => {
            let id = c.u32()?;
            let schema = c.cstr()?;
            let name = c.cstr()?;
            let replica_identity = c.u8()?;
            let count = c.u16()?;
            let mut columns = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let flags = c.u8()?;
                let name = c.cstr()?;
                let type_oid = c.u32()?;
                let _typmod = c.u32()?;
                columns.push(RelationColumn {
                    name,
                    type_oid,
                    is_key: flags & 1 == 1,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = c.u32()?;
            expect(&mut c, b'N')?;
            Message::Insert {
                relation,
                new: tuple(&mut c)?,
            }
        }
        b'U' => {
            let relation = c.u32()?;
            let mut kind = c.u8()?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(tuple(&mut c)?);
                kind = c.u8()?;
            }
            if kind != b'N' {
                return Err(DecodeError(format!("update without new tuple ({kind})")));
            }
            Message::Update {
                relation,
                old,
                new: tuple(&mut c)?,
            }
        }
        b'D' => {
            let relation = c.u32()?;
            let kind = c.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(DecodeError(format!("delete without old tuple ({kind})")));
            }
            Message::Delete {
                relation,
                old: tuple(&mut c)?,
            }
        }
        b'T' => {
            let count = c.u32()?;
            let _options = c.u8()?;
            let mut relations = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                relations.push(c.u32()?);
            }
            Message::Truncate { relations }
        }
        b'Y' | b'O' | b'M' => Message::Other(tag),
        other => return Err(DecodeError(format!("unknown message type {other}"))),
    })
}

fn expect(c: &mut Cursor<'_>, want: u8) -> Result<(), DecodeError> {
    let got = c.u8()?;
    if got == want {
        Ok(())
    } else {
        Err(DecodeError(format!(
            "expected '{}', got '{}'",
            want as char, got as char
        )))
    }
}

fn tuple(c: &mut Cursor<'_>) -> Result<Vec<Datum>, DecodeError> {
    let count = c.u16()?;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        out.push(match c.u8()? {
            b'n' => Datum::Null,
            b'u' => Datum::Unchanged,
            b't' => {
                let len = c.u32()? as usize;
                Datum::Text(String::from_utf8_lossy(c.take(len)?).into_owned())
            }
            // Binary values only come when asked for (`binary 'true'`), which we never do.
            other => return Err(DecodeError(format!("unexpected column kind {other}"))),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => out.push(b'n'),
                Some(s) => {
                    out.push(b't');
                    out.extend((s.len() as u32).to_be_bytes());
                    out.extend(s.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn decodes_begin_commit() {
        let mut b = vec![b'B'];
        b.extend(0x16B_3748u64.to_be_bytes());
        b.extend(5i64.to_be_bytes());
        b.extend(42u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: 0x16B_3748,
                commit_time: 5,
                xid: 42
            }
        );
        let mut c = vec![b'C', 0];
        c.extend(10u64.to_be_bytes());
        c.extend(20u64.to_be_bytes());
        c.extend(7i64.to_be_bytes());
        assert_eq!(
            decode(&c).unwrap(),
            Message::Commit {
                commit_lsn: 10,
                end_lsn: 20,
                commit_time: 7
            }
        );
    }

    #[test]
    fn decodes_relation_and_rows() {
        let mut r = vec![b'R'];
        r.extend(16384u32.to_be_bytes());
        r.extend(b"public\0users\0");
        r.push(b'd');
        r.extend(2u16.to_be_bytes());
        r.push(1);
        r.extend(b"id\0");
        r.extend(23u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        r.push(0);
        r.extend(b"name\0");
        r.extend(25u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        let Message::Relation(rel) = decode(&r).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(rel.name, "users");
        assert!(rel.columns[0].is_key && !rel.columns[1].is_key);

        let mut u = vec![b'U'];
        u.extend(16384u32.to_be_bytes());
        u.push(b'K');
        u.extend(text_tuple(&[Some("1"), None]));
        u.push(b'N');
        let mut new = text_tuple(&[Some("2")]);
        new[1] = 2; // two columns: "2" and an unchanged TOAST value
        new.push(b'u');
        u.extend(new);
        assert_eq!(
            decode(&u).unwrap(),
            Message::Update {
                relation: 16384,
                old: Some(vec![Datum::Text("1".into()), Datum::Null]),
                new: vec![Datum::Text("2".into()), Datum::Unchanged],
            }
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        for len in 0..12 {
            let mut b = vec![b'B'];
            b.extend(1u64.to_be_bytes());
            b.truncate(len);
            assert!(decode(&b).is_err());
        }
        assert!(decode(b"Z").is_err());
        let mut i = vec![b'I'];
        i.extend(1u32.to_be_bytes());
        i.push(b'N');
        i.extend(1u16.to_be_bytes());
        i.push(b't');
        i.extend(100u32.to_be_bytes());
        i.extend(b"short");
        assert!(decode(&i).is_err());
    }
}
