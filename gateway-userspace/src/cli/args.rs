//! Every option of the `gateway` command line, with its help text. Parsed once in
//! [`super::main`]; nothing downstream reads raw arguments.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::config::AttachMode;

#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "eBPF/XDP-accelerated edge gateway: kernel blocklists and rate limits, managed from one CLI",
    after_help = "Examples:\n  gateway run --config /etc/gateway/gateway.toml\n  gateway block add 203.0.113.0/24 --ttl 1h --reason scanner\n  gateway stats --watch\n  gateway status"
)]
pub struct Cli {
    /// Admin socket of the daemon to talk to.
    #[arg(long, global = true, env = "GATEWAY_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Instance whose default socket (/run/gateway/<INSTANCE>.sock) to talk to.
    #[arg(long, global = true, default_value = "gateway", value_name = "NAME")]
    pub instance: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, attach it and serve the admin API until SIGINT/SIGTERM.
    #[command(
        after_help = "Examples:\n  gateway run --config examples/gateway.toml\n  gateway run --config gateway.toml --xdp-mode generic"
    )]
    Run(RunArgs),
    /// Manage the blocklist (dropped in the kernel, whatever the protocol).
    #[command(subcommand)]
    Block(ListCommand),
    /// Manage the allowlist (always passes; wins over the blocklist and rate limit).
    #[command(subcommand)]
    Allow(ListCommand),
    /// Kernel counters per verdict reason, with rates.
    #[command(
        after_help = "Examples:\n  gateway stats\n  gateway stats --watch\n  gateway stats --json"
    )]
    Stats(StatsArgs),
    /// Interfaces, attach mode, program id and map fill levels.
    #[command(after_help = "Examples:\n  gateway status\n  gateway status --json")]
    Status(JsonArg),
    /// Re-read the daemon's config file and apply it, all or nothing (as SIGHUP does). A config
    /// that does not validate, or changes what applies only at start, is refused and the
    /// running one keeps serving.
    #[command(after_help = "Example:\n  gateway reload")]
    Reload,
    /// Manage API keys (stored as hashes; a key's secret is printed once, at creation).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Bans, manual and automatic: list them, see why an address is banned, lift them.
    #[command(subcommand)]
    Bans(BansCommand),
    /// Validate a config file without starting anything.
    #[command(after_help = "Example:\n  gateway check-config /etc/gateway/gateway.toml")]
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Hash a password for `auth.basic.users_file` (Argon2id): reads it from standard input
    /// (without echo on a terminal) and prints the `USER:HASH` line to add to the file.
    #[command(
        after_help = "Examples:\n  gateway hash-password alice >> /etc/gateway/basic-users\n  printf %s \"$PASSWORD\" | gateway hash-password alice"
    )]
    HashPassword {
        /// The user name (no `:`).
        user: String,
    },
    /// A tiny HTTP/1.1 and h2c echo server for demos: answers every request with JSON
    /// describing it (method, path, headers, body size).
    #[command(
        hide = true,
        after_help = "Example:\n  gateway demo-upstream --listen 127.0.0.1:8081"
    )]
    DemoUpstream(DemoUpstreamArgs),
}

#[derive(Debug, Args)]
pub struct DemoUpstreamArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file.
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// Attach mode for every interface, overriding `xdp.mode` (generic is for testing).
    #[arg(long, value_enum, value_name = "MODE")]
    pub xdp_mode: Option<XdpModeArg>,
    /// Replace pinned maps left by an incompatible build (bans come back from the state file).
    #[arg(long)]
    pub replace_stale_pins: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum XdpModeArg {
    Native,
    Generic,
}

impl From<XdpModeArg> for AttachMode {
    fn from(value: XdpModeArg) -> Self {
        match value {
            XdpModeArg::Native => AttachMode::Native,
            XdpModeArg::Generic => AttachMode::Generic,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// Add addresses or prefixes (updates the TTL and reason of existing ones).
    #[command(
        after_help = "Examples:\n  gateway block add 203.0.113.7\n  gateway block add 203.0.113.0/24 2001:db8::/48 --ttl 1h --reason \"credential stuffing\""
    )]
    Add {
        /// Addresses or CIDRs.
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
        #[command(flatten)]
        entry: EntryArgs,
    },
    /// Remove addresses or prefixes.
    #[command(
        alias = "rm",
        after_help = "Example:\n  gateway block del 203.0.113.0/24"
    )]
    Del {
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
    },
    /// List entries with origin, expiry, hits and reason.
    #[command(
        alias = "ls",
        after_help = "Examples:\n  gateway block list\n  gateway block list --json"
    )]
    List(JsonArg),
    /// Add every CIDR of a file (one per line, `#` comments allowed); bad lines are reported
    /// with their numbers and skipped.
    #[command(
        after_help = "Example:\n  gateway block import /etc/gateway/spamhaus-drop.txt --ttl 24h --reason drop-list"
    )]
    Import {
        file: PathBuf,
        #[command(flatten)]
        entry: EntryArgs,
    },
    /// Write every entry to a file that `import` reads back.
    #[command(after_help = "Example:\n  gateway block export /tmp/bans.txt")]
    Export { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once: it cannot be shown again, only revoked.
    #[command(
        after_help = "Examples:\n  gateway keys create --owner svc-billing --scopes orders:read --ttl 30d\n  gateway keys create --owner ci --scopes deploy:write,deploy:read"
    )]
    Create {
        /// Who the key is for; requests with it act as this principal.
        #[arg(long, value_name = "NAME")]
        owner: String,
        /// What the key grants, comma-separated or repeated (e.g. orders:read).
        #[arg(long, value_name = "SCOPE", value_delimiter = ',')]
        scopes: Vec<String>,
        /// How long the key is valid (e.g. 12h, 30d); until revoked if omitted.
        #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
        ttl: Option<Duration>,
    },
    /// List keys with owner, scopes, expiry and status (never a secret).
    #[command(
        alias = "ls",
        after_help = "Examples:\n  gateway keys list\n  gateway keys list --json"
    )]
    List(JsonArg),
    /// Revoke a key at once and for good.
    #[command(after_help = "Example:\n  gateway keys revoke 3f9c2a7d1e0b4c55")]
    Revoke {
        /// The key id, as `gateway keys list` shows it (the part after `gw_`).
        #[arg(value_name = "KEY_ID")]
        key_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BansCommand {
    /// Every ban with its origin (`auto` from abuse rules, `manual`, `import`, `config`),
    /// expiry, hits and reason.
    #[command(
        alias = "ls",
        after_help = "Examples:\n  gateway bans list\n  gateway bans list --json"
    )]
    List(JsonArg),
    /// Why an address is banned: the entries holding it, until when, the rule and evidence.
    #[command(after_help = "Example:\n  gateway bans explain 203.0.113.7")]
    Explain {
        /// An IPv4 or IPv6 address.
        address: String,
        #[arg(long)]
        json: bool,
    },
    /// Lift every ban holding an address (except entries of the config file).
    #[command(after_help = "Example:\n  gateway bans lift 203.0.113.7")]
    Lift {
        /// An IPv4 or IPv6 address.
        address: String,
    },
}

#[derive(Debug, Args)]
pub struct EntryArgs {
    /// How long the entries last (e.g. 90s, 10m, 1h, 30d); permanent if omitted.
    #[arg(long, value_parser = parse_ttl, value_name = "DURATION")]
    pub ttl: Option<Duration>,
    /// Why, shown in `list` (at most 256 bytes, no control characters).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print again every interval (default 1s) with rates, until interrupted.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "1s", value_parser = parse_ttl)]
    pub watch: Option<Duration>,
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration ({e}); examples: 90s, 10m, 1h, 30d"))?;
    if duration.is_zero() {
        return Err("a duration must be longer than zero".to_owned());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn block_add_parses_ttl_and_reason() {
        let cli = Cli::try_parse_from([
            "gateway",
            "block",
            "add",
            "203.0.113.0/24",
            "--ttl",
            "1h",
            "--reason",
            "scan",
        ])
        .unwrap();
        let Command::Block(ListCommand::Add { cidrs, entry }) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(cidrs, ["203.0.113.0/24"]);
        assert_eq!(entry.ttl, Some(Duration::from_secs(3600)));
        assert_eq!(entry.reason.as_deref(), Some("scan"));
    }

    #[test]
    fn bad_ttls_are_usage_errors() {
        for ttl in ["soon", "0s", "1x"] {
            let err = Cli::try_parse_from(["gateway", "block", "add", "1.2.3.4", "--ttl", ttl])
                .unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{ttl}");
        }
    }

    #[test]
    fn keys_create_takes_comma_separated_scopes() {
        let cli = Cli::try_parse_from([
            "gateway",
            "keys",
            "create",
            "--owner",
            "svc-billing",
            "--scopes",
            "orders:read,orders:write",
            "--ttl",
            "30d",
        ])
        .unwrap();
        let Command::Keys(KeysCommand::Create { owner, scopes, ttl }) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(owner, "svc-billing");
        assert_eq!(scopes, ["orders:read", "orders:write"]);
        assert_eq!(ttl, Some(Duration::from_secs(30 * 86_400)));
    }

    #[test]
    fn stats_watch_defaults_to_one_second() {
        let cli = Cli::try_parse_from(["gateway", "stats", "--watch"]).unwrap();
        let Command::Stats(args) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(args.watch, Some(Duration::from_secs(1)));
    }
}
