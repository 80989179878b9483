//! Hiding passwords in what the proxy shows (SHOW CONFIG, status, logs): a URI's
//! `user:password@`, a `password=` query parameter, and a libpq conninfo's
//! `password=...` (quoted or not).

const HIDDEN: &str = "********";

/// Keys whose whole value is a secret (`users[0].password`, `proxy.admin_token`).
pub fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    matches!(last, "password" | "admin_token" | "token")
}

/// `text` with every password in it replaced by asterisks.
pub fn mask_passwords(text: &str) -> String {
    mask_sql_passwords(&mask_conninfo_passwords(&mask_uri_passwords(text)))
}

/// `scheme://user:password@host` → `scheme://user:********@host`, for every URI in
/// `text`.
fn mask_uri_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let start = scheme_end + 3;
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let authority_end = rest
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@')
            && let Some(colon) = authority[..at].find(':')
        {
            out.push_str(&authority[..colon]);
            out.push(':');
            out.push_str(HIDDEN);
            out.push_str(&authority[at..]);
        } else {
            out.push_str(authority);
        }
        rest = &rest[authority_end..];
    }
    out.push_str(rest);
    out
}

/// SQL's `PASSWORD 'secret'` (CREATE/ALTER ROLE) → `PASSWORD '********'`.
fn mask_sql_passwords(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(i) = lower[at..].find("password '") {
        let quote = at + i + "password ".len();
        out.push_str(&text[at..quote + 1]);
        out.push_str(HIDDEN);
        // Up to the closing quote ('' inside is an escaped quote).
        let mut end = text.len();
        let bytes = text.as_bytes();
        let mut j = quote + 1;
        while j < bytes.len() {
            if bytes[j] == b'\'' {
                if bytes.get(j + 1) == Some(&b'\'') {
                    j += 2;
                    continue;
                }
                end = j;
                break;
            }
            j += 1;
        }
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// Every `password=value` (a URI parameter or a conninfo word; the value quoted or not).
fn mask_conninfo_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = find_password_key(rest) {
        let value_start = found + "password=".len();
        out.push_str(&rest[..value_start]);
        out.push_str(HIDDEN);
        let value = &rest[value_start..];
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            // Up to the closing quote; \' inside is escaped.
            let mut end = quoted.len();
            let mut chars = quoted.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    _ => {}
                }
            }
            1 + end
        } else {
            value
                .find(|c: char| c.is_whitespace() || c == '&' || c == '#')
                .unwrap_or(value.len())
        };
        rest = &value[value_len..];
    }
    out.push_str(rest);
    out
}

/// Where a `password=` key starts: at the beginning, or after a separator.
fn find_password_key(text: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = text[from..].find("password=") {
        let at = from + i;
        let before = text[..at].chars().next_back();
        if before.is_none_or(|c| c.is_whitespace() || c == '?' || c == '&') {
            return Some(at);
        }
        from = at + "password=".len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::mask_passwords;

    #[test]
    fn passwords_are_hidden_wherever_they_are_written() {
        assert_eq!(
            mask_passwords("postgresql://app:s3cr3t@10.0.0.1:5432/app"),
            "postgresql://app:********@10.0.0.1:5432/app"
        );
        assert_eq!(
            mask_passwords("postgres://u:p%40ss@h/db?sslmode=require&password=other"),
            "postgres://u:********@h/db?sslmode=require&password=********"
        );
        assert_eq!(
            mask_passwords("mongodb://root:pw@127.0.0.1:27017/analytics"),
            "mongodb://root:********@127.0.0.1:27017/analytics"
        );
        assert_eq!(
            mask_passwords("user=postgres password='my \\' pass' host=10.0.0.2 port=5433"),
            "user=postgres password=******** host=10.0.0.2 port=5433"
        );
        assert_eq!(
            mask_passwords("host=h password=plain sslmode=prefer"),
            "host=h password=******** sslmode=prefer"
        );
        assert_eq!(
            mask_passwords("from postgresql://a:x@h/db to mongodb://b:y@m/db"),
            "from postgresql://a:********@h/db to mongodb://b:********@m/db"
        );
        assert_eq!(
            mask_passwords("ALTER ROLE app PASSWORD 'it''s secret' VALID UNTIL 'x'"),
            "ALTER ROLE app PASSWORD '********' VALID UNTIL 'x'"
        );
        assert_eq!(
            mask_passwords(
                "executing simple query: ALTER SYSTEM SET primary_conninfo = 'user=u password=p host=h'"
            ),
            "executing simple query: ALTER SYSTEM SET primary_conninfo = 'user=u password=******** host=h'"
        );
        // Nothing to hide: unchanged, including look-alikes.
        for text in [
            "postgresql://app@h/db",
            "postgresql://h:5432/db",
            "user=x passwordless=1",
            "round-robin",
        ] {
            assert_eq!(mask_passwords(text), text);
        }
    }
}
