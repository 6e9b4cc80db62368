//! Messages of the admin API: one JSON object per line each way, a request then its response.
use serde::{Deserialize, Serialize};

use crate::{
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
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Added(AddReport),
    Removed(RemoveReport),
    Entries { entries: Vec<EntryView> },
    Stats(StatsView),
    Status(StatusView),
    Error { message: String },
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
