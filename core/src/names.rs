//! Names of bdr's replication slots and origins: one format and its parse, so the name a
//! provider gives a slot, the name a subscriber gives an origin and the node read back
//! from an origin's name cannot drift apart.
//!
//! Both are `bdr_<database oid>_<node name>`: a slot on a provider (database `dboid`)
//! names the subscriber it feeds; an origin on a subscriber names the provider whose
//! changes it tracks. The database oid has no `_`, so a node name with underscores parses
//! back whole.

const PREFIX: &str = "bdr_";

/// Name of the slot on a provider (database `provider_dboid`) that feeds `subscriber`.
pub fn slot_name(provider_dboid: u32, subscriber: &str) -> String {
    format!("{PREFIX}{provider_dboid}_{subscriber}")
}

/// Name of the replication origin on a subscriber (database `local_dboid`) for changes
/// coming from `provider`.
pub fn origin_name(local_dboid: u32, provider: &str) -> String {
    format!("{PREFIX}{local_dboid}_{provider}")
}

/// The (database oid, node name) of a slot or origin name bdr made; `None` for any other.
pub fn parse(name: &str) -> Option<(u32, &str)> {
    let (dboid, node) = name.strip_prefix(PREFIX)?.split_once('_')?;
    Some((dboid.parse().ok()?, node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        assert_eq!(slot_name(16384, "node_2"), "bdr_16384_node_2");
        assert_eq!(parse(&origin_name(5, "a_b_c")), Some((5, "a_b_c")));
        assert_eq!(parse(&slot_name(7, "")), Some((7, "")));
        assert_eq!(parse("pg_16384_x"), None);
        assert_eq!(parse("bdr_x_y"), None);
        assert_eq!(parse("bdr_12"), None);
    }
}
