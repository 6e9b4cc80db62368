//! The daemon's one TOML file: parsed with serde into typed structs with documented defaults,
//! then validated as a whole. Nothing downstream reads raw TOML.
//!
//! The L7 gateway's sections (`[[listeners]]`, `[[routes]]`, `[[upstreams]]`, `[http]`) live in
//! [`l7`].
pub mod abuse;
pub mod auth;
/// `[authz]` (Cedar schema and policies) and a route's `authz` rules.
pub mod authz;
pub mod cors;
mod l7;
pub mod ratelimit;
/// A route's request validation (`validate = { ... }`).
pub mod validate;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::cidr::Cidr;

pub use self::l7::{
    Balance, CertificateConfig, ClientAuthConfig, ClientAuthMode, HealthCheckConfig, HttpConfig,
    ListenerConfig, OutlierConfig, RouteCacheConfig, RouteConfig, SYSTEM_CA_BUNDLE, TlsConfig,
    UpstreamConfig, UpstreamProtocol, UpstreamTlsConfig,
};

/// Where pinned maps live; each instance gets its own folder below it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file `{path}` is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// The whole daemon configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this daemon: pins go to `/sys/fs/bpf/<instance>/`, the admin socket defaults to
    /// `/run/gateway/<instance>.sock`. Several instances can run side by side. Default `gateway`.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// Folder for persisted state (the ban list). Default `/var/lib/gateway/<instance>`.
    pub state_dir: Option<PathBuf>,
    /// Admin API socket path. Default `/run/gateway/<instance>.sock`.
    pub admin_socket: Option<PathBuf>,
    #[serde(default)]
    pub xdp: XdpConfig,
    /// L7 listeners. None (the default) means no L7 gateway runs.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// L7 routes, referenced by name from listeners.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// L7 upstream pools, referenced by name from routes.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Protective limits of the L7 listeners.
    #[serde(default)]
    pub http: HttpConfig,
    /// Authentication: API keys and trusted JWT issuers.
    #[serde(default)]
    pub auth: auth::AuthConfig,
    /// Authorization: the Cedar schema and policy files routes may ask.
    #[serde(default)]
    pub authz: authz::AuthzConfig,
    /// The admin HTTP listener with `/metrics`, `/healthz` and `/readyz`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The abuse verdict loop: rules that turn outcomes into kernel bans.
    #[serde(default)]
    pub abuse: abuse::AbuseConfig,
}

/// The admin HTTP listener. Off unless `listen` is set; keep it on loopback or a management
/// network, apart from the data-plane listeners.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve on, e.g. `127.0.0.1:9901`.
    pub listen: Option<std::net::SocketAddr>,
    /// When set, `/metrics` wants `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
}

fn default_instance() -> String {
    "gateway".to_owned()
}

/// How the program is attached to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// In the driver, before any socket buffer exists: what production wants.
    #[default]
    Native,
    /// In the kernel stack after the socket buffer is built: works on any interface (loopback,
    /// drivers without XDP), at a fraction of native speed.
    Generic,
}

/// What to do with non-first IP fragments once their source passed the list and rate checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FragmentPolicy {
    #[default]
    Pass,
    Drop,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XdpConfig {
    /// Interfaces to attach to. Default: none (the daemon then only serves the admin API).
    pub interfaces: Vec<String>,
    /// Attach mode for every interface. Default `native`.
    pub mode: AttachMode,
    /// Sources that always pass, whatever the blocklist or rate limit says.
    pub allowlist: Vec<Cidr>,
    /// Sources that are always dropped (permanent bans kept with the config).
    pub blocklist: Vec<Cidr>,
    /// How often expired bans are removed from the maps. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// How long a change to the ban list may wait before it is written to disk. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub persist_interval: Duration,
    /// What to do with non-first fragments. Default `pass`.
    pub non_first_fragments: FragmentPolicy,
    pub rate_limit: RateLimitConfig,
}

impl Default for XdpConfig {
    fn default() -> Self {
        XdpConfig {
            interfaces: Vec::new(),
            mode: AttachMode::Native,
            allowlist: Vec::new(),
            blocklist: Vec::new(),
            sweep_interval: Duration::from_secs(5),
            persist_interval: Duration::from_secs(1),
            non_first_fragments: FragmentPolicy::Pass,
            rate_limit: RateLimitConfig::default(),
        }
    }
}

/// Per-source token bucket enforced in the kernel.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Default `true`.
    pub enabled: bool,
    /// Sustained packets per second per source. Default 20,000.
    pub packets_per_second: u64,
    /// Bucket size in packets. Default 40,000.
    pub burst: u64,
    /// Sustained bytes per second per source; unset means no byte limit.
    pub bytes_per_second: Option<u64>,
    /// Bucket size in bytes. Default: one second's worth of `bytes_per_second`.
    pub burst_bytes: Option<u64>,
    /// IPv6 sources are aggregated to this prefix (one host usually owns a /64). Default 64.
    pub ipv6_prefix_len: u8,
    /// At most one rate-limit event per source per this interval. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub event_interval: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: true,
            packets_per_second: 20_000,
            burst: 40_000,
            bytes_per_second: None,
            burst_bytes: None,
            ipv6_prefix_len: 64,
            event_interval: Duration::from_secs(1),
        }
    }
}

/// Rates above this would overflow the kernel's 64-bit token arithmetic.
const MAX_RATE: u64 = 1_000_000_000;

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|error| match error {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: PathBuf::new(),
            message: error.to_string(),
        })?;
        // Once per load: the pools and the abuse loop's protected addresses use these.
        for (i, upstream) in config.upstreams.iter_mut().enumerate() {
            upstream.resolve(&format!("upstreams[{i}]"))?;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = !self.instance.is_empty()
            && self.instance.len() <= 32
            && self
                .instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(invalid(
                "instance",
                "use 1 to 32 letters, digits, `-` or `_` (it names a folder under /sys/fs/bpf)",
            ));
        }
        let xdp = &self.xdp;
        for (i, name) in xdp.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(invalid(
                    &format!("xdp.interfaces[{i}]"),
                    format!("`{name}` is not a valid interface name"),
                ));
            }
            if xdp.interfaces[..i].contains(name) {
                return Err(invalid(
                    &format!("xdp.interfaces[{i}]"),
                    format!("`{name}` is listed twice"),
                ));
            }
        }
        if let Some(i) = xdp.blocklist.iter().position(|c| c.prefix_len() == 0) {
            return Err(invalid(
                &format!("xdp.blocklist[{i}]"),
                "a /0 prefix would drop every packet; list the networks to block instead",
            ));
        }
        if xdp.sweep_interval < Duration::from_millis(100) {
            return Err(invalid("xdp.sweep_interval", "must be at least 100ms"));
        }
        let rate = &xdp.rate_limit;
        if rate.enabled {
            if rate.packets_per_second == 0 || rate.packets_per_second > MAX_RATE {
                return Err(invalid(
                    "xdp.rate_limit.packets_per_second",
                    format!("must be between 1 and {MAX_RATE} (or set `enabled = false`)"),
                ));
            }
            if rate.burst == 0 || rate.burst > MAX_RATE {
                return Err(invalid(
                    "xdp.rate_limit.burst",
                    format!("must be between 1 and {MAX_RATE}"),
                ));
            }
            if let Some(bps) = rate.bytes_per_second
                && !(1500..=MAX_RATE).contains(&bps)
            {
                return Err(invalid(
                    "xdp.rate_limit.bytes_per_second",
                    format!("must be between 1500 (one full frame) and {MAX_RATE}"),
                ));
            }
            if let Some(burst) = rate.burst_bytes
                && !(1500..=MAX_RATE).contains(&burst)
            {
                return Err(invalid(
                    "xdp.rate_limit.burst_bytes",
                    format!("must be between 1500 (one full frame) and {MAX_RATE}"),
                ));
            }
        }
        if !(1..=128).contains(&rate.ipv6_prefix_len) {
            return Err(invalid(
                "xdp.rate_limit.ipv6_prefix_len",
                "must be between 1 and 128 (64 groups one typical host)",
            ));
        }
        l7::validate(&self.listeners, &self.routes, &self.upstreams, &self.http)?;
        auth::validate(&self.auth)?;
        auth::validate_basic_routes(&self.auth, &self.listeners, &self.routes)?;
        authz::validate(&self.authz, &self.routes)?;
        abuse::validate(&self.abuse)?;
        Ok(())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| Path::new("/var/lib/gateway").join(&self.instance))
    }

    /// The persisted ban list.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir().join("lists.tsv")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| default_admin_socket(&self.instance))
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(&self.instance)
    }
}

/// The admin socket of an instance that does not override it.
pub fn default_admin_socket(instance: &str) -> PathBuf {
    Path::new("/run/gateway").join(format!("{instance}.sock"))
}

impl RateLimitConfig {
    /// The kernel's view of these settings.
    pub fn runtime(&self, fragments: FragmentPolicy) -> gateway_common::RuntimeConfig {
        use gateway_common::{RuntimeConfig, features, fragment_policy};
        let mut runtime = RuntimeConfig {
            features: features::ALLOWLIST | features::BLOCKLIST | features::EVENTS,
            fragment_policy: match fragments {
                FragmentPolicy::Pass => fragment_policy::PASS,
                FragmentPolicy::Drop => fragment_policy::DROP,
            },
            ipv6_prefix_len: u32::from(self.ipv6_prefix_len),
            event_interval_ns: u64::try_from(self.event_interval.as_nanos()).unwrap_or(u64::MAX),
            ..RuntimeConfig::default()
        };
        if self.enabled {
            runtime.features |= features::RATE_LIMIT;
            runtime.packets_per_second = self.packets_per_second;
            runtime.burst_packets = self.burst;
            if let Some(bps) = self.bytes_per_second {
                runtime.features |= features::BYTE_RATE_LIMIT;
                runtime.bytes_per_second = bps;
                runtime.burst_bytes = self.burst_bytes.unwrap_or(bps);
            }
        }
        runtime
    }
}

impl XdpConfig {
    pub fn runtime(&self) -> gateway_common::RuntimeConfig {
        self.rate_limit.runtime(self.non_first_fragments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.instance, "gateway");
        assert_eq!(config.xdp.mode, AttachMode::Native);
        assert!(config.xdp.rate_limit.enabled);
        assert_eq!(config.xdp.rate_limit.ipv6_prefix_len, 64);
        assert_eq!(
            config.state_file(),
            Path::new("/var/lib/gateway/gateway/lists.tsv")
        );
        assert_eq!(
            config.admin_socket(),
            Path::new("/run/gateway/gateway.sock")
        );
        assert_eq!(config.pin_dir(), Path::new("/sys/fs/bpf/gateway"));
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../../examples/gateway.toml");
        let config = Config::parse(text).unwrap();
        assert_eq!(config.xdp.interfaces, ["lo"]);
        assert_eq!(config.xdp.mode, AttachMode::Generic);
        assert_eq!(
            config.listeners.len(),
            2,
            "HTTPS and a redirecting HTTP listener"
        );
        assert!(
            config.listeners[0]
                .tls
                .as_ref()
                .is_some_and(|tls| tls.self_signed)
        );
    }

    #[test]
    fn full_config_parses() {
        let config = Config::parse(
            r#"
            instance = "edge-1"
            state_dir = "/tmp/gw"
            [xdp]
            interfaces = ["eth0", "eth1"]
            mode = "generic"
            allowlist = ["10.0.0.0/8", "::1"]
            blocklist = ["203.0.113.0/24"]
            sweep_interval = "2s"
            non_first_fragments = "drop"
            [xdp.rate_limit]
            packets_per_second = 100
            burst = 200
            bytes_per_second = 1000000
            ipv6_prefix_len = 56
            event_interval = "500ms"
            "#,
        )
        .unwrap();
        assert_eq!(config.xdp.allowlist.len(), 2);
        let runtime = config.xdp.runtime();
        assert_eq!(runtime.packets_per_second, 100);
        assert_eq!(runtime.burst_bytes, 1_000_000);
        assert_eq!(runtime.ipv6_prefix_len, 56);
        assert_eq!(runtime.event_interval_ns, 500_000_000);
        assert_eq!(
            runtime.fragment_policy,
            gateway_common::fragment_policy::DROP
        );
        assert_ne!(
            runtime.features & gateway_common::features::BYTE_RATE_LIMIT,
            0
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("instance = \"a/b\"", "instance"),
            (
                "[xdp]\ninterfaces = [\"eth0\", \"eth0\"]",
                "xdp.interfaces[1]",
            ),
            ("[xdp]\nblocklist = [\"0.0.0.0/0\"]", "xdp.blocklist[0]"),
            (
                "[xdp.rate_limit]\npackets_per_second = 0",
                "xdp.rate_limit.packets_per_second",
            ),
            (
                "[xdp.rate_limit]\nipv6_prefix_len = 0",
                "xdp.rate_limit.ipv6_prefix_len",
            ),
        ];
        for (text, key) in cases {
            match Config::parse(text) {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key, "{text}"),
                other => panic!("{text}: expected an error for `{key}`, got {other:?}"),
            }
        }
    }

    #[test]
    fn syntax_errors_and_unknown_keys_are_reported() {
        let err = Config::parse("[xdp]\nallowlist = [\"10.0.0.1/8\"]").unwrap_err();
        assert!(err.to_string().contains("host bits"), "{err}");
        let err = Config::parse("[xdp]\ninterface = [\"eth0\"]").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = Config::parse("[xdp.rate_limit]\nevent_interval = \"soon\"").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn disabled_rate_limit_clears_the_feature() {
        let config =
            Config::parse("[xdp.rate_limit]\nenabled = false\npackets_per_second = 0").unwrap();
        let runtime = config.xdp.runtime();
        assert_eq!(runtime.features & gateway_common::features::RATE_LIMIT, 0);
    }
}
