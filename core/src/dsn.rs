//! Connection strings (libpq `key=value` conninfo): redaction for anything a user or a log
//! can read, and small edits (adding a key when absent).
//!
//! Invariant: [`redact`] output never contains the value of a `password` key, whatever the
//! quoting; it is what every message, log line and view shows.

/// One `key=value` pair of a conninfo string, value unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub key: String,
    pub value: String,
}

/// Parse a `key=value key2='quoted value'` conninfo. URIs (`postgresql://`) are returned
/// as an error: callers must use the key/value form.
pub fn parse(dsn: &str) -> Result<Vec<Pair>, String> {
    let s = dsn.trim();
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        return Err("connection URIs are not supported; use key=value form".into());
    }
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!(
                "missing \"=\" after \"{key}\" in connection string"
            ));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n)
                        }
                    }
                    '\'' => {
                        closed = true;
                        break;
                    }
                    _ => value.push(c),
                }
            }
            if !closed {
                return Err("unterminated quoted string in connection string".into());
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        if key.is_empty() {
            return Err("empty key in connection string".into());
        }
        out.push(Pair { key, value });
    }
    Ok(out)
}

fn quote(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return v.to_owned();
    }
    let mut s = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// Render pairs back into a conninfo string.
pub fn render(pairs: &[Pair]) -> String {
    pairs
        .iter()
        .map(|p| format!("{}={}", p.key, quote(&p.value)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The DSN with any password replaced by `********`. Unparseable input is replaced whole.
pub fn redact(dsn: &str) -> String {
    match parse(dsn) {
        Ok(mut pairs) => {
            for p in &mut pairs {
                if p.key == "password" {
                    p.value = "********".into();
                }
            }
            render(&pairs)
        }
        Err(_) => "<unparseable connection string>".into(),
    }
}

/// The value of `key`, if present (last one wins, as in libpq).
pub fn get(dsn: &str, key: &str) -> Option<String> {
    parse(dsn)
        .ok()?
        .into_iter()
        .rev()
        .find(|p| p.key == key)
        .map(|p| p.value)
}

/// `dsn` with `key=value` appended unless the key is already set.
pub fn with_default(dsn: &str, key: &str, value: &str) -> String {
    if get(dsn, key).is_some() {
        return dsn.to_owned();
    }
    format!("{} {}={}", dsn.trim(), key, quote(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_quoted() {
        let p = parse("host=h port = 5432 password='a b\\'c' dbname=d").unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(p[1].value, "5432");
        assert_eq!(p[2].value, "a b'c");
        assert!(parse("host").is_err());
        assert!(parse("password='open").is_err());
        assert!(parse("postgresql://u@h/d").is_err());
    }

    #[test]
    fn redacts_every_password_form() {
        for dsn in [
            "host=h password=secret dbname=d",
            "host=h password='se cret' dbname=d",
            "password = secret",
            "host=h password=sec\\ ret",
        ] {
            let r = redact(dsn);
            assert!(!r.contains("secret") && !r.contains("cret"), "{dsn} -> {r}");
            assert!(r.contains("password=********"), "{r}");
        }
        assert_eq!(redact("password='x"), "<unparseable connection string>");
    }

    #[test]
    fn defaults_and_lookup() {
        assert_eq!(get("a=1 b=2 a=3", "a").as_deref(), Some("3"));
        assert_eq!(
            with_default("host=h", "connect_timeout", "10"),
            "host=h connect_timeout=10"
        );
        assert_eq!(
            with_default("host=h connect_timeout=3", "connect_timeout", "10"),
            "host=h connect_timeout=3"
        );
        assert_eq!(
            with_default("host=h", "application_name", "a b"),
            "host=h application_name='a b'"
        );
    }
}
