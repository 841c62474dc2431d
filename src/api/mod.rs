//! The SQL API in schema `bdr`: admin and monitoring functions.
//!
//! Every function here is a thin shell: it checks its input, then calls into the catalog
//! and worker modules. All are revoked from PUBLIC (see `sql/finalize.sql`).

use pgrx::prelude::*;

pub mod compare;
pub mod group;
pub mod group_error;
pub mod join;
pub mod lifecycle;
pub mod monitor;
pub mod workers;

/// The extension's version and the wire protocol range it speaks.
#[pg_extern]
pub fn version() -> String {
    format!(
        "bdr {} (protocol {}..{})",
        env!("CARGO_PKG_VERSION"),
        bdr_core::wire::PROTOCOL_VERSION_MIN,
        bdr_core::wire::PROTOCOL_VERSION_MAX
    )
}

/// Raise the configuration error that keeps replication from starting, if any
/// (`wal_level`, `track_commit_timestamp`); returns true when the server is ready.
#[pg_extern]
fn check_replication_config() -> bool {
    crate::error::check_server_config().unwrap_or_else(|e| crate::error::raise(&e));
    true
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn version_names_protocol() {
        let v = Spi::get_one::<String>("SELECT bdr.version()")
            .unwrap()
            .unwrap();
        assert!(v.starts_with("bdr "), "{v}");
        assert!(v.contains("protocol 1..4"), "{v}");
    }

    #[pg_test]
    fn catalog_tables_exist() {
        let n = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'bdr' AND c.relname IN ('nodes', 'conflict_history')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(n, 2);
    }

    #[pg_test]
    fn options_parse_and_negotiate() {
        use crate::decode::DecodeOptions;
        let o = DecodeOptions::parse([("forward_origins", Some("all"))]).unwrap();
        assert!(o.forward_origins);
        assert_eq!(o.version, bdr_core::wire::PROTOCOL_VERSION_MAX);
        let o = DecodeOptions::parse([("max_proto_version", Some("1"))]).unwrap();
        assert_eq!(o.version, 1);
        let e = DecodeOptions::parse([("min_proto_version", Some("5"))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bdr output plugin cannot speak protocol versions 5 to 5"
        );
        assert!(!o.streaming, "streaming only when asked");
        let o = DecodeOptions::parse([("streaming", Some("on"))]).unwrap();
        assert!(o.streaming && o.version >= bdr_core::wire::STREAM_FROM_VERSION);
        let below = [("max_proto_version", Some("3")), ("streaming", Some("on"))];
        assert!(DecodeOptions::parse(below).is_err());
        let forwarding = [("forward_origins", Some("all")), ("streaming", Some("on"))];
        assert!(DecodeOptions::parse(forwarding).is_err());
        assert!(DecodeOptions::parse([("streaming", Some("maybe"))]).is_err());
        assert!(DecodeOptions::parse([("bogus", None)]).is_err());
        assert!(DecodeOptions::parse([("forward_origins", Some("some"))]).is_err());
    }
}
