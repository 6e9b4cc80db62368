//! The gateway daemon and its control plane.
//!
//! - [`xdp`]: loading, pinning and attaching the XDP program; typed handles on its maps.
//! - [`lists`]: the allowlist and blocklist as the operator sees them (origin, reason, expiry),
//!   kept in step with the kernel maps and persisted across restarts.
//! - [`admin`]: the root-only Unix-socket API that the CLI talks to.
//! - [`config`]: the daemon's TOML file, parsed and validated.
//! - [`cli`]: the `gateway` command line.
//! - [`tls`]: TLS termination for the L7 listeners: rustls config, SNI certificates, reload.
//! - [`routing`]: path normalisation and the route table (deny by default).
//! - [`proxy`]: the L7 gateway: listeners, the phase pipeline, upstream pools, the one
//!   error-to-response place, the access log.
//! - [`metrics`]: Prometheus metrics (L7 families, kernel counters) and the admin HTTP
//!   listener with `/metrics`, `/healthz`, `/readyz`.
//! - [`daemon`]: `gateway run`, wiring the above together.
pub mod admin;
pub mod cidr;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod lists;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod tls;
pub mod xdp;
