pub mod conflict;
pub mod ddl;
pub mod dsn;
pub mod lag;
pub mod replication;
pub mod snowflake;
pub mod stream;
pub mod wire;
