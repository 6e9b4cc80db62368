//! The control plane: a JSON-lines API on a Unix socket that only root can open (mode 0600,
//! peer credentials checked), separate from any data-plane listener. The CLI is its client.
pub mod client;
pub mod protocol;
pub mod server;
