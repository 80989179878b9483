//! The process log: tracing events formatted by tracing-subscriber, each line passed
//! through [`mask_passwords`] on its way out. Masking at the writer covers every
//! source at once, libraries included (tokio-postgres logs the statements it runs at
//! debug level, and re-pointing a replica runs one with a password in it).

use std::io::{self, Write};

use crate::config::mask_passwords;

/// Installs the global subscriber: `RUST_LOG` or `info`, to standard output.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(|| MaskingWriter(io::stdout()))
        .init();
}

/// Writes whole formatted events with passwords hidden.
pub struct MaskingWriter<W>(pub W);

impl<W: Write> Write for MaskingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        // Cheap test first: only text that could hold a secret is rewritten.
        if text.contains('@') || text.contains("assword") || text.contains("ASSWORD") {
            self.0.write_all(mask_passwords(&text).as_bytes())?;
        } else {
            self.0.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_leave_without_their_passwords() {
        let mut out = MaskingWriter(Vec::new());
        out.write_all(b"DEBUG executing simple query: ALTER SYSTEM SET primary_conninfo = 'user=u password=hunter2 host=h'\n")
            .unwrap();
        out.write_all(b"WARN cannot reach postgresql://u:hunter2@10.0.0.9/app\n")
            .unwrap();
        out.write_all(b"INFO nothing secret\n").unwrap();
        let text = String::from_utf8(out.0).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("nothing secret") && text.contains("primary_conninfo"));
    }
}
