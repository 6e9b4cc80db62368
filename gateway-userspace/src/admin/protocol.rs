//! Messages of the admin API: one JSON object per line each way, a request then its response.
use serde::{Deserialize, Serialize};

use crate::{
    auth::apikeys::KeyView,
    lists::{AddReport, EntrySpec, EntryView, RemoveReport},
    xdp::{ListKind, MapFill},
};

/// Largest request line the daemon reads (a bulk import batch is well below this).
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Add or update entries (`origin` is `manual` or `import`).
    Add {
        list: ListKind,
        entries: Vec<EntrySpec>,
        #[serde(default)]
        import: bool,
    },
    Remove {
        list: ListKind,
        cidrs: Vec<String>,
    },
    List {
        list: ListKind,
    },
    Stats,
    Status,
    /// Re-read the config file and apply it, or keep the running one and say why not.
    Reload,
    /// Why an address is banned: its blocklist entries, an L7 denial, recent verdicts.
    BansExplain {
        address: String,
    },
    /// Lifts every ban holding an address (blocklist entries not from the config file, and L7
    /// denials).
    BansLift {
        address: String,
    },
    /// Create an API key; only this response ever carries its secret.
    KeysCreate {
        owner: String,
        #[serde(default)]
        scopes: Vec<String>,
        /// Time to live in milliseconds; absent = until revoked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    KeysList,
    KeysRevoke {
        key_id: String,
    },
}

/// `KeyCreated.secret` is the whole API key (`gw_<id>_<secret>`): no other response carries it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Added(AddReport),
    Removed(RemoveReport),
    Entries {
        entries: Vec<EntryView>,
    },
    Stats(StatsView),
    Status(StatusView),
    Reloaded {
        message: String,
    },
    Explained(BanExplanation),
    Lifted {
        removed: Vec<String>,
        l7_denials: usize,
    },
    KeyCreated {
        key: KeyView,
        secret: String,
    },
    Keys {
        keys: Vec<KeyView>,
    },
    KeyRevoked {
        key: KeyView,
    },
    Error {
        message: String,
    },
}

/// Everything known about why an address is banned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BanExplanation {
    pub address: String,
    /// Blocklist entries that hold the address, with origin, reason, expiry and hits.
    pub entries: Vec<EntryView>,
    /// Denied at L7 (it reached the gateway through a trusted proxy).
    pub denied_at_l7: bool,
    /// The most recent audit-log records about prefixes holding the address, oldest first.
    pub verdicts: Vec<serde_json::Value>,
}

/// Kernel counters for one verdict reason.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReasonCount {
    pub reason: String,
    pub dropped: bool,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsView {
    /// Monotonic time of the reading, to compute rates between two readings.
    pub monotonic_ns: u64,
    pub reasons: Vec<ReasonCount>,
    /// Rate-limit events received from the kernel since the daemon started.
    pub rate_limit_events: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceView {
    pub name: String,
    /// `native` or `generic`.
    pub mode: crate::config::AttachMode,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusView {
    pub instance: String,
    pub program_id: Option<u32>,
    pub interfaces: Vec<InterfaceView>,
    pub pin_dir: String,
    pub reused_pins: bool,
    pub state_file: String,
    pub uptime_secs: u64,
    pub allow_entries: usize,
    pub block_entries: usize,
    pub maps: Vec<MapFill>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let request = Request::Add {
            list: ListKind::Block,
            entries: vec![EntrySpec {
                cidr: "203.0.113.0/24".into(),
                ttl_ms: Some(3_600_000),
                reason: None,
            }],
            import: false,
        };
        let line = serde_json::to_string(&request).unwrap();
        assert_eq!(
            line,
            r#"{"op":"add","list":"block","entries":[{"cidr":"203.0.113.0/24","ttl_ms":3600000}],"import":false}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"stats"}"#).unwrap(),
            Request::Stats
        );
    }

    #[test]
    fn key_requests_have_a_stable_wire_form() {
        let request = Request::KeysCreate {
            owner: "svc-billing".into(),
            scopes: vec!["orders:read".into()],
            ttl_ms: Some(86_400_000),
        };
        let line = serde_json::to_string(&request).unwrap();
        assert_eq!(
            line,
            r#"{"op":"keys_create","owner":"svc-billing","scopes":["orders:read"],"ttl_ms":86400000}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"keys_list"}"#).unwrap(),
            Request::KeysList
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"keys_revoke","key_id":"0123456789abcdef"}"#)
                .unwrap(),
            Request::KeysRevoke {
                key_id: "0123456789abcdef".into()
            }
        );
    }

    #[test]
    fn unknown_operations_fail_to_parse() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"add","list":"grey"}"#).is_err());
    }

    #[test]
    fn responses_round_trip() {
        let response = Response::Removed(RemoveReport {
            removed: 2,
            missing: vec![],
        });
        let line = serde_json::to_string(&response).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), response);
    }
}
