pub mod dsn;
pub mod stream;
pub mod wire;
