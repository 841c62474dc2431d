//! Pure pieces of the join's versioned copy (src/api/join_copy.rs): reading the version
//! columns the source appends to every COPY row, and naming the node behind an origin.
//!
//! The source sends each row in COPY text format with two extra trailing fields: the
//! commit timestamp to give it (`\N` when it is older than the join's horizon or unknown)
//! and the replication origin id of its last writer on the source. In text format a tab
//! or newline inside a value is escaped (`\t`, `\n`), so the last two raw tabs of a line
//! are always the separators of the two appended fields.

/// A row of the versioned COPY: the table's own fields (with the line's trailing newline
/// removed), the version's commit timestamp as text (None for `\N`) and the origin id.
#[derive(Debug, PartialEq, Eq)]
pub struct VersionedRow<'a> {
    pub fields: &'a [u8],
    pub commit_time: Option<&'a str>,
    pub origin: u32,
}

/// Split one COPY text line (as `PQgetCopyData` returns it) into the row and its version.
/// None if the line does not end with the two version fields.
pub fn split_versioned_row(line: &[u8]) -> Option<VersionedRow<'_>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let last = line.iter().rposition(|&b| b == b'\t')?;
    let origin = std::str::from_utf8(&line[last + 1..]).ok()?.parse().ok()?;
    let rest = &line[..last];
    // No tab left: a table without columns (its rows are empty lines in COPY).
    let (fields, ts) = match rest.iter().rposition(|&b| b == b'\t') {
        Some(prev) => (&rest[..prev], &rest[prev + 1..]),
        None => (&rest[..0], rest),
    };
    let ts = std::str::from_utf8(ts).ok()?;
    Some(VersionedRow {
        fields,
        commit_time: (ts != "\\N").then_some(ts),
        origin,
    })
}

/// The node named by a bdr replication origin (`bdr_<database oid>_<node name>`), as the
/// apply stage reads it; None for any other origin.
pub fn origin_node(roname: &str) -> Option<&str> {
    let rest = roname.strip_prefix("bdr_")?;
    let (db, node) = rest.split_once('_')?;
    (!db.is_empty() && db.bytes().all(|b| b.is_ascii_digit()) && !node.is_empty()).then_some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_two_trailing_fields() {
        let r = split_versioned_row(b"1\tit\\tab\\n\t2026-11-29 22:00:00.000001+00\t3\n").unwrap();
        assert_eq!(r.fields, b"1\tit\\tab\\n");
        assert_eq!(r.commit_time, Some("2026-11-29 22:00:00.000001+00"));
        assert_eq!(r.origin, 3);
        let r = split_versioned_row(b"\\N\t\\N\t0\n").unwrap();
        assert_eq!(r.fields, b"\\N");
        assert_eq!(r.commit_time, None);
        assert_eq!(r.origin, 0);
        // A row whose only column is the empty string.
        let r = split_versioned_row(b"\t\\N\t0\n").unwrap();
        assert_eq!(r.fields, b"");
        assert_eq!(r.commit_time, None);
        // A table with no columns: only the version.
        let r = split_versioned_row(b"2026-11-29 22:00:00+00\t7\n").unwrap();
        assert_eq!(r.fields, b"");
        assert_eq!(r.commit_time, Some("2026-11-29 22:00:00+00"));
        assert_eq!(r.origin, 7);
    }

    #[test]
    fn refuses_lines_without_a_version() {
        assert_eq!(split_versioned_row(b"1\n"), None);
        assert_eq!(split_versioned_row(b"1\tx\n"), None);
        assert_eq!(split_versioned_row(b"1\t\xff\t3\n"), None);
        assert_eq!(split_versioned_row(b"a\tb\tnot a number\n"), None);
    }

    #[test]
    fn names_the_node_of_bdr_origins_only() {
        assert_eq!(origin_node("bdr_16384_node2"), Some("node2"));
        assert_eq!(origin_node("bdr_16384_my_node"), Some("my_node"));
        assert_eq!(origin_node("pg_16400"), None);
        assert_eq!(origin_node("bdr_x_node"), None);
        assert_eq!(origin_node("bdr_16384_"), None);
    }
}
