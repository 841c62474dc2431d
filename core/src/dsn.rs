//! Connection strings (libpq `key=value` conninfo): redaction for anything a user or a log
//! can read, and small edits (adding a key when absent).
//!
//! Invariants: [`redact`] output never contains the value of a secret key (`password`,
//! `sslpassword`: [`SECRET_KEYS`]), whatever the quoting; it is what every message, log
//! line and view shows. [`for_client`] keeps secrets off a child program's command line
//! (which every local user can read in `/proc`).

/// Keys whose values are secrets.
pub const SECRET_KEYS: &[&str] = &["password", "sslpassword"];

/// Whether `key` holds a secret.
pub fn is_secret(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
}

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

/// The DSN with any secret (password, sslpassword) replaced by `********`. Unparseable
/// input is replaced whole.
pub fn redact(dsn: &str) -> String {
    match parse(dsn) {
        Ok(mut pairs) => {
            for p in &mut pairs {
                if is_secret(&p.key) {
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

/// The session settings under which a node sends values as text to another node, so that
/// every value has one unambiguous form whatever the sender's own configuration says: a
/// date in ISO order (`DateStyle = 'SQL, DMY'` on a peer sent 3 January 2024 as
/// `03/01/2024`, read as 1 March elsewhere), an interval in `postgres` style, a float with
/// every digit (`extra_float_digits = 0` rounds to 15), timestamps in UTC, `bytea` in hex,
/// `money` in the C locale. Every connection bdr makes to another node asks for them
/// ([`peer_session_options`]), and bdr's output plugin sets them in its walsender.
/// PostgreSQL's own walreceiver asks for the first three for the same reason.
pub const PEER_TEXT_SETTINGS: [(&str, &str); 6] = [
    ("datestyle", "ISO"),
    ("intervalstyle", "postgres"),
    ("extra_float_digits", "3"),
    ("timezone", "UTC"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
];

/// [`PEER_TEXT_SETTINGS`] as libpq `options` (`-c name=value ...`).
pub fn peer_session_options() -> String {
    PEER_TEXT_SETTINGS
        .iter()
        .map(|(k, v)| format!("-c {k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `dsn` with `extra` (`-c name=value ...`) added after its own `options`, so that `extra`
/// wins where both set a setting. Unparseable input is returned as it is (libpq then
/// reports it).
pub fn with_options(dsn: &str, extra: &str) -> String {
    let Ok(mut pairs) = parse(dsn) else {
        return dsn.to_owned();
    };
    match pairs.iter_mut().rev().find(|p| p.key == "options") {
        Some(p) if !p.value.trim().is_empty() => p.value = format!("{} {extra}", p.value.trim()),
        Some(p) => p.value = extra.to_owned(),
        None => pairs.push(Pair {
            key: "options".into(),
            value: extra.to_owned(),
        }),
    }
    render(&pairs)
}

/// For connection options naming several hosts (comma-separated `host` and/or
/// `hostaddr`, with one `port` or one per host, as libpq takes them): one set of options
/// per host, in the order libpq tries them, each with that host's `host`, `hostaddr` and
/// `port` and every other option as given. `Ok(None)` when they name one host or none;
/// `Err` when the lists' lengths disagree (libpq refuses those too).
pub fn split_hosts(pairs: &[Pair]) -> Result<Option<Vec<Vec<Pair>>>, String> {
    let list = |key: &str| {
        pairs
            .iter()
            .rev()
            .find(|p| p.key == key)
            .map(|p| p.value.split(',').map(str::to_owned).collect::<Vec<_>>())
    };
    let (hosts, addrs, ports) = (list("host"), list("hostaddr"), list("port"));
    let n = match (&hosts, &addrs) {
        (Some(h), Some(a)) if h.len() != a.len() => {
            return Err(format!(
                "could not match {} host names to {} hostaddr values",
                h.len(),
                a.len()
            ))
        }
        (Some(h), _) => h.len(),
        (None, Some(a)) => a.len(),
        (None, None) => 1,
    };
    if n <= 1 {
        return Ok(None);
    }
    let port_of = |i: usize| match &ports {
        Some(p) if p.len() == 1 => Ok(Some(p[0].clone())),
        Some(p) if p.len() == n => Ok(Some(p[i].clone())),
        Some(p) => Err(format!(
            "could not match {} port numbers to {n} hosts",
            p.len()
        )),
        None => Ok(None),
    };
    let rest = pairs
        .iter()
        .filter(|p| !matches!(p.key.as_str(), "host" | "hostaddr" | "port"));
    (0..n)
        .map(|i| {
            let own = [
                ("host", hosts.as_ref().map(|h| h[i].clone())),
                ("hostaddr", addrs.as_ref().map(|a| a[i].clone())),
                ("port", port_of(i)?),
            ];
            let own = own.into_iter().filter_map(|(key, value)| {
                value.map(|value| Pair {
                    key: key.into(),
                    value,
                })
            });
            Ok(rest.clone().cloned().chain(own).collect())
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Some)
}

/// How to give a conninfo to a client program (`pg_dump`, `psql`) with no secret on its
/// command line: `argv_dsn` is the conninfo without secrets (what goes on the command
/// line); the password travels in `PGPASSWORD` (a process's environment is readable only
/// by its own OS user), and an `sslpassword` in a service file (`service_file`: its
/// contents, to be written with mode 0600 at the path given in `PGSERVICEFILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConn {
    pub argv_dsn: String,
    pub env: Vec<(String, String)>,
    pub service_file: Option<String>,
}

/// Name of the service section [`for_client`] writes.
pub const CLIENT_SERVICE: &str = "bdr_client";

/// Split `dsn` for a client program; `service_path` is where the caller will write
/// `service_file`, if any.
pub fn for_client(dsn: &str, service_path: &str) -> Result<ClientConn, String> {
    let pairs = parse(dsn)?;
    let (secrets, rest): (Vec<Pair>, Vec<Pair>) =
        pairs.into_iter().partition(|p| is_secret(&p.key));
    let mut out = ClientConn {
        argv_dsn: render(&rest),
        env: Vec::new(),
        service_file: None,
    };
    // libpq: the last value of a key wins.
    let last = |k: &str| {
        secrets
            .iter()
            .rev()
            .find(|p| p.key == k)
            .map(|p| p.value.clone())
    };
    if let Some(pw) = last("password") {
        out.env.push(("PGPASSWORD".into(), pw));
    }
    if let Some(ssl) = last("sslpassword") {
        // A service file line is key=value up to the end of the line, trailing white space
        // removed; a service named in the DSN itself would be replaced.
        if ssl.contains(['\n', '\r', '\0']) || ssl.ends_with(char::is_whitespace) {
            return Err("sslpassword ends with white space or contains a line break".into());
        }
        if rest.iter().any(|p| p.key == "service") {
            return Err("a connection string with both service and sslpassword".into());
        }
        out.service_file = Some(format!("[{CLIENT_SERVICE}]\nsslpassword={ssl}\n"));
        out.env
            .push(("PGSERVICEFILE".into(), service_path.to_owned()));
        out.argv_dsn = format!("service={CLIENT_SERVICE} {}", out.argv_dsn);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(dsn: &str) -> Result<Option<Vec<String>>, String> {
        split_hosts(&parse(dsn).unwrap()).map(|o| o.map(|v| v.iter().map(|p| render(p)).collect()))
    }

    #[test]
    fn peer_session_options_are_added_after_the_dsns_own() {
        let x = "-c datestyle=ISO -c timezone=UTC";
        assert_eq!(
            with_options("host=a dbname=x", x),
            "host=a dbname=x options='-c datestyle=ISO -c timezone=UTC'"
        );
        // The DSN's own options stay, ours come after them (the later -c wins).
        let got = with_options("host=a options='-c statement_timeout=0' password='p w'", x);
        assert_eq!(
            get(&got, "options").unwrap(),
            "-c statement_timeout=0 -c datestyle=ISO -c timezone=UTC"
        );
        assert_eq!(get(&got, "password").unwrap(), "p w");
        assert_eq!(get(&with_options("options=''", x), "options").unwrap(), x);
        // libpq reads the options with its own parser: one value, spaces quoted.
        let all = peer_session_options();
        assert_eq!(parse(&with_options("dbname=x", &all)).unwrap().len(), 2);
        assert!(
            all.starts_with("-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3")
        );
        // Not ours to rewrite: a URI is left to libpq.
        assert_eq!(with_options("postgresql://a/x", x), "postgresql://a/x");
    }

    #[test]
    fn splits_several_hosts_into_one_conninfo_each() {
        assert_eq!(split("host=a dbname=x").unwrap(), None);
        assert_eq!(split("dbname=x").unwrap(), None);
        assert_eq!(
            split("host=a,b port=5433 dbname=x connect_timeout=3").unwrap(),
            Some(vec![
                "dbname=x connect_timeout=3 host=a port=5433".into(),
                "dbname=x connect_timeout=3 host=b port=5433".into(),
            ])
        );
        assert_eq!(
            split("host=a,b hostaddr=10.0.0.1,10.0.0.2 port=1,2 password='p w'").unwrap(),
            Some(vec![
                "password='p w' host=a hostaddr=10.0.0.1 port=1".into(),
                "password='p w' host=b hostaddr=10.0.0.2 port=2".into(),
            ])
        );
        assert_eq!(
            split("hostaddr=10.0.0.1,10.0.0.2").unwrap(),
            Some(vec!["hostaddr=10.0.0.1".into(), "hostaddr=10.0.0.2".into()])
        );
        // An empty entry is the default host (or port), as in libpq.
        assert_eq!(
            split("host=a, port=").unwrap(),
            Some(vec!["host=a port=''".into(), "host='' port=''".into()])
        );
        assert!(split("host=a,b port=1,2,3").is_err());
        assert!(split("host=a,b hostaddr=10.0.0.1").is_err());
    }

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
    fn redacts_ssl_passwords_too() {
        for dsn in [
            "host=h sslpassword=secret sslkey=/k dbname=d",
            "host=h sslpassword='se cret' password=secret2",
            "sslpassword = 'sec\\'ret'",
        ] {
            let r = redact(dsn);
            assert!(!r.contains("secret") && !r.contains("cret"), "{dsn} -> {r}");
            assert!(r.contains("sslpassword=********"), "{r}");
        }
        // Keys that merely contain the word are not secrets.
        assert_eq!(redact("passfile=/p"), "passfile=/p");
    }

    #[test]
    fn client_programs_get_no_secret_on_their_command_line() {
        let c = for_client(
            "host=h port=5 password='p w' dbname=d sslpassword=k3y user=u",
            "/tmp/svc",
        )
        .unwrap();
        assert_eq!(
            c.argv_dsn,
            "service=bdr_client host=h port=5 dbname=d user=u"
        );
        assert!(!c.argv_dsn.contains("p w") && !c.argv_dsn.contains("k3y"));
        assert_eq!(
            c.env,
            vec![
                ("PGPASSWORD".to_string(), "p w".to_string()),
                ("PGSERVICEFILE".to_string(), "/tmp/svc".to_string())
            ]
        );
        assert_eq!(
            c.service_file.as_deref(),
            Some("[bdr_client]\nsslpassword=k3y\n")
        );
        // No secret: nothing to hide, nothing changes.
        let plain = for_client("host=h dbname=d", "/tmp/svc").unwrap();
        assert_eq!(plain.argv_dsn, "host=h dbname=d");
        assert!(plain.env.is_empty() && plain.service_file.is_none());
        // The last password wins, as in libpq.
        let two = for_client("password=a password=b", "/x").unwrap();
        assert_eq!(two.env, vec![("PGPASSWORD".to_string(), "b".to_string())]);
        assert_eq!(two.argv_dsn, "");
        assert!(for_client("sslpassword='x '", "/x").is_err());
        assert!(for_client("service=s sslpassword=x", "/x").is_err());
        assert!(for_client("password='open", "/x").is_err());
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
