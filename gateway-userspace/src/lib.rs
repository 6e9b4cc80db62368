//! The gateway daemon and its control plane.
//!
//! - [`xdp`]: loading, pinning and attaching the XDP program; typed handles on its maps.
//! - [`lists`]: the allowlist and blocklist as the operator sees them (origin, reason, expiry),
//!   kept in step with the kernel maps and persisted across restarts.
//! - [`abuse`]: the abuse verdict loop: outcomes counted per source, rules, escalating bans
//!   in the XDP blocklist, the audit log.
//! - [`admin`]: the root-only Unix-socket API that the CLI talks to.
//! - [`config`]: the daemon's TOML file, parsed and validated.
//! - [`auth`]: the authenticate phase: JWTs, API keys, client certificates and (legacy) HTTP
//!   Basic to a typed `Identity`.
//! - [`authz`]: the authorize phase: per-route scope, role and claim rules and Cedar policies.
//! - [`validate`]: the validate phase: methods, content types, body limits, JSON Schema, OpenAPI.
//! - [`ratelimit`]: the rate-limit phase: per-route GCRA limits and quotas by identity, API
//!   key, source or route, with the `RateLimit-Policy`/`RateLimit`/`Retry-After` headers.
//! - [`cors`]: per-route CORS: preflights answered by the gateway, `Access-Control-*` headers.
//! - [`cli`]: the `gateway` command line.
//! - [`tls`]: TLS termination for the L7 listeners: rustls config, SNI certificates, reload.
//! - [`routing`]: path normalisation and the route table (deny by default).
//! - [`proxy`]: the L7 gateway: listeners, the phase pipeline, upstream pools, the one
//!   error-to-response place, the access log.
//! - [`metrics`]: Prometheus metrics (L7 families, kernel counters) and the admin HTTP
//!   listener with `/metrics`, `/healthz`, `/readyz`.
//! - [`daemon`]: `gateway run`, wiring the above together.
pub mod abuse;
pub mod admin;
pub mod auth;
pub mod authz;
pub mod cidr;
pub mod cli;
pub mod config;
pub mod cors;
pub mod daemon;
pub mod lists;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod routing;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod validate;
pub mod xdp;
