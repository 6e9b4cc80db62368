//! A route's L7 rate limits and quotas (`[[routes.rate_limits]]`) as written in the file, and
//! their validation. [`crate::ratelimit`] builds the limiters from them.
//!
//! ```toml
//! [[routes.rate_limits]]
//! key = "api_key"          # identity | api_key | source | route
//! rate = "10/s"            # N/s, N/min, N/h or N/day
//! burst = 20               # default: N
//!
//! [[routes.rate_limits]]
//! key = "api_key"
//! rate = "1000/day"        # a daily quota: 1000 at once at most, one more every 86.4 s
//! ```
//!
//! A login-like route gets stricter limits the same way, say `5/min` per `source` with
//! `burst = 5`, and `100/h` per `route` so that many sources together cannot try more.
use std::{fmt, num::NonZeroU32, str::FromStr, time::Duration};

use serde::Deserialize;

use super::{ConfigError, invalid};

/// What a limit counts requests by: each distinct key has its own budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKeyKind {
    /// The authenticated principal. Requests without one are counted by `source` instead, so
    /// an anonymous client gets what one identity gets, not an unlimited pass.
    Identity,
    /// The id of the authenticated API key. Requests without one are counted by `source`.
    ApiKey,
    /// The client address; IPv6 addresses count by their /64, which one host usually owns
    /// whole, so rotating addresses inside it does not buy a fresh budget.
    Source,
    /// The whole route: one budget shared by every client.
    Route,
}

impl LimitKeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKeyKind::Identity => "identity",
            LimitKeyKind::ApiKey => "api_key",
            LimitKeyKind::Source => "source",
            LimitKeyKind::Route => "route",
        }
    }
}

/// The window a rate is counted over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Window {
    Second,
    Minute,
    Hour,
    Day,
}

impl Window {
    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Window::Second => 1,
            Window::Minute => 60,
            Window::Hour => 3600,
            Window::Day => 86_400,
        })
    }

    /// The unit as operators write it in `rate`.
    pub fn unit(self) -> &'static str {
        match self {
            Window::Second => "s",
            Window::Minute => "min",
            Window::Hour => "h",
            Window::Day => "day",
        }
    }
}

/// `count` requests per `window`: the sustained rate, and with the default burst also the
/// quota over one window (`1000/day` allows 1000 at once at most and one more every 86.4 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: NonZeroU32,
    pub window: Window,
}

/// The largest count of a rate: GCRA spaces requests `window / count` apart, and a nanosecond
/// is the finest spacing the limiter keeps.
pub const MAX_COUNT: u32 = 1_000_000_000;

impl Rate {
    /// The time one request's worth of budget takes to come back.
    pub fn period(self) -> Duration {
        self.window.duration() / self.count.get()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.window.unit())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "expected N/s, N/min, N/h or N/day with N from 1 to {MAX_COUNT}, e.g. `10/s` or `1000/day`"
)]
pub struct RateParseError;

impl FromStr for Rate {
    type Err = RateParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (count, unit) = text.split_once('/').ok_or(RateParseError)?;
        let count = count.trim();
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RateParseError);
        }
        let count = count
            .parse::<u32>()
            .ok()
            .filter(|count| *count <= MAX_COUNT)
            .and_then(NonZeroU32::new)
            .ok_or(RateParseError)?;
        let window = match unit.trim() {
            "s" | "sec" | "second" => Window::Second,
            "min" | "minute" => Window::Minute,
            "h" | "hour" => Window::Hour,
            "d" | "day" => Window::Day,
            _ => return Err(RateParseError),
        };
        Ok(Rate { count, window })
    }
}

/// One limit of a route. A route may have several (say 10/s with a burst of 20 per API key,
/// and 1000/day per API key); a request passes only if every one of them lets it through.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRateLimitConfig {
    /// What requests are counted by.
    pub key: LimitKeyKind,
    /// `N/s`, `N/min`, `N/h` or `N/day`.
    pub rate: String,
    /// How many requests may come at once before the rate applies. Default: the rate's `N`.
    pub burst: Option<u32>,
    /// The policy name clients see in `RateLimit-Policy` and `RateLimit`. Default
    /// `<key>-<N>-<unit>`, e.g. `api_key-10-s`.
    pub name: Option<String>,
    /// Most keys tracked at once. Keys idle long enough to have their whole burst back are
    /// forgotten first; when the limiter is full of active keys, those closest to a full
    /// budget are. Default 100,000.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_max_keys() -> usize {
    100_000
}

const MAX_KEYS: usize = 10_000_000;

impl RouteRateLimitConfig {
    /// The parsed `rate`; validation has checked that it parses. `key` is this limit's key
    /// path, e.g. `routes[2].rate_limits[0]`.
    pub fn parsed_rate(&self, key: &str) -> Result<Rate, ConfigError> {
        self.rate
            .parse()
            .map_err(|error: RateParseError| invalid(&format!("{key}.rate"), error.to_string()))
    }

    /// `burst`, or the rate's count when unset.
    pub fn effective_burst(&self, rate: Rate) -> u32 {
        self.burst.unwrap_or(rate.count.get())
    }

    /// `name`, or the name derived from key and rate.
    pub fn policy_name(&self, rate: Rate) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => format!(
                "{}-{}-{}",
                self.key.as_str(),
                rate.count,
                rate.window.unit()
            ),
        }
    }
}

/// Checks the limits of the route at key path `route_key` (e.g. `routes[2]`).
pub(super) fn validate(
    route_key: &str,
    limits: &[RouteRateLimitConfig],
) -> Result<(), ConfigError> {
    let mut names = Vec::with_capacity(limits.len());
    for (i, limit) in limits.iter().enumerate() {
        let key = format!("{route_key}.rate_limits[{i}]");
        let rate = limit.parsed_rate(&key)?;
        if let Some(burst) = limit.burst
            && !(1..=MAX_COUNT).contains(&burst)
        {
            return Err(invalid(
                &format!("{key}.burst"),
                format!("must be between 1 and {MAX_COUNT}"),
            ));
        }
        if !(1..=MAX_KEYS).contains(&limit.max_keys) {
            return Err(invalid(
                &format!("{key}.max_keys"),
                format!("must be between 1 and {MAX_KEYS}"),
            ));
        }
        let name = limit.policy_name(rate);
        // Clients see the name inside a quoted structured-field string: keep it to characters
        // that need no escaping.
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
            });
        if !name_ok {
            return Err(invalid(
                &format!("{key}.name"),
                "use 1 to 64 lowercase letters, digits, `-`, `_` or `.`",
            ));
        }
        if let Some(j) = names.iter().position(|seen| *seen == name) {
            return Err(invalid(
                &format!("{key}.name"),
                format!(
                    "`{name}` is also the name of `rate_limits[{j}]`; give one of them another `name` (or remove the duplicate)"
                ),
            ));
        }
        names.push(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    const BASE: &str = r#"
        [[upstreams]]
        name = "app"
        endpoints = ["127.0.0.1:8081"]
        [[routes]]
        name = "open"
        path_prefix = "/open/"
        upstream = "app"
        [[routes]]
        name = "api"
        path_prefix = "/api/"
        upstream = "app"
    "#;

    fn with_limits(limits: &str) -> String {
        format!("{BASE}\n{limits}")
    }

    #[test]
    fn rates_parse_in_every_unit() {
        let cases = [
            ("10/s", 10, Window::Second, Duration::from_millis(100)),
            ("10/sec", 10, Window::Second, Duration::from_millis(100)),
            ("30/min", 30, Window::Minute, Duration::from_secs(2)),
            ("3600/h", 3600, Window::Hour, Duration::from_secs(1)),
            ("1000/day", 1000, Window::Day, Duration::from_millis(86_400)),
            ("5 / minute", 5, Window::Minute, Duration::from_secs(12)),
        ];
        for (text, count, window, period) in cases {
            let rate: Rate = text
                .parse()
                .unwrap_or_else(|error| panic!("`{text}`: {error}"));
            assert_eq!(rate.count.get(), count, "{text}");
            assert_eq!(rate.window, window, "{text}");
            assert_eq!(rate.period(), period, "{text}");
        }
        for bad in [
            "",
            "10",
            "10/",
            "/s",
            "0/s",
            "-1/s",
            "+1/s",
            "1.5/s",
            "10/week",
            "10/S",
            "x/s",
            "4294967296/s",
            "1000000001/s",
        ] {
            assert_eq!(bad.parse::<Rate>(), Err(RateParseError), "`{bad}` parsed");
        }
    }

    #[test]
    fn several_limits_per_route_parse_with_defaults() {
        let text = with_limits(
            r#"
            [[routes.rate_limits]]
            key = "api_key"
            rate = "10/s"
            burst = 20
            [[routes.rate_limits]]
            key = "api_key"
            rate = "1000/day"
            [[routes.rate_limits]]
            key = "route"
            rate = "5/min"
            name = "login.global"
            max_keys = 1
            "#,
        );
        let config = Config::parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
        assert!(config.routes[0].rate_limits.is_empty(), "`open` has none");
        let limits = &config.routes[1].rate_limits;
        assert_eq!(limits.len(), 3);
        let rates: Vec<Rate> = limits
            .iter()
            .map(|limit| limit.parsed_rate("test").expect("validated"))
            .collect();
        assert_eq!(limits[0].key, LimitKeyKind::ApiKey);
        assert_eq!(limits[0].effective_burst(rates[0]), 20);
        assert_eq!(limits[0].policy_name(rates[0]), "api_key-10-s");
        assert_eq!(limits[0].max_keys, 100_000, "the default");
        assert_eq!(
            limits[1].effective_burst(rates[1]),
            1000,
            "burst defaults to N"
        );
        assert_eq!(limits[1].policy_name(rates[1]), "api_key-1000-day");
        assert_eq!(limits[2].key, LimitKeyKind::Route);
        assert_eq!(limits[2].policy_name(rates[2]), "login.global");
    }

    #[test]
    fn errors_name_the_key_path_and_say_what_to_write() {
        let cases = [
            (
                "[[routes.rate_limits]]\nkey = \"source\"\nrate = \"10/week\"",
                "routes[1].rate_limits[0].rate",
                "expected N/s, N/min, N/h or N/day",
            ),
            (
                "[[routes.rate_limits]]\nkey = \"source\"\nrate = \"1/s\"\n[[routes.rate_limits]]\nkey = \"source\"\nrate = \"ten/s\"",
                "routes[1].rate_limits[1].rate",
                "expected N/s, N/min, N/h or N/day",
            ),
            (
                "[[routes.rate_limits]]\nkey = \"source\"\nrate = \"10/s\"\nburst = 0",
                "routes[1].rate_limits[0].burst",
                "between 1 and",
            ),
            (
                "[[routes.rate_limits]]\nkey = \"source\"\nrate = \"10/s\"\nmax_keys = 0",
                "routes[1].rate_limits[0].max_keys",
                "between 1 and",
            ),
            (
                "[[routes.rate_limits]]\nkey = \"source\"\nrate = \"10/s\"\nname = \"Has Space\"",
                "routes[1].rate_limits[0].name",
                "lowercase letters",
            ),
            (
                "[[routes.rate_limits]]\nkey = \"source\"\nrate = \"10/s\"\n[[routes.rate_limits]]\nkey = \"source\"\nrate = \"10/s\"\nburst = 30",
                "routes[1].rate_limits[1].name",
                "also the name of `rate_limits[0]`",
            ),
        ];
        for (limits, key, hint) in cases {
            let text = with_limits(limits);
            match Config::parse(&text) {
                Err(ConfigError::Invalid { key: got, message }) => {
                    assert_eq!(got, key, "{message}\n{text}");
                    assert!(message.contains(hint), "`{message}` lacks `{hint}`");
                }
                other => panic!("expected an error for `{key}`, got {other:?}\n{text}"),
            }
        }
    }

    #[test]
    fn unknown_key_kinds_and_fields_are_refused_by_the_parser() {
        for (limits, hint) in [
            (
                "[[routes.rate_limits]]\nkey = \"cookie\"\nrate = \"10/s\"",
                "expected one of `identity`, `api_key`, `source`, `route`",
            ),
            (
                "[[routes.rate_limits]]\nkey = \"source\"\nrate = \"10/s\"\nburts = 3",
                "unknown field `burts`",
            ),
        ] {
            let text = with_limits(limits);
            match Config::parse(&text) {
                Err(ConfigError::Parse { message, .. }) => {
                    assert!(message.contains(hint), "`{message}` lacks `{hint}`");
                }
                other => panic!("expected a parse error, got {other:?}\n{text}"),
            }
        }
    }
}
