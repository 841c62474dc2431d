pub mod conflict;
pub mod dsn;
pub mod stream;
pub mod wire;
