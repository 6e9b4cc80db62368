//! `gateway status`: what is attached where, and how full the maps are.
use std::fmt::Write as _;

use super::{Exit, Failure};
use crate::admin::{
    client::AdminClient,
    protocol::{Request, Response, StatusView},
};

pub(super) fn run(client: &mut AdminClient, json: bool) -> Result<Exit, Failure> {
    let Response::Status(status) = client.call(&Request::Status)? else {
        return Err(anyhow::anyhow!("the daemon answered with an unexpected response").into());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(Exit::Success)
}

fn render(status: &StatusView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "instance:    {}", status.instance);
    let _ = writeln!(
        out,
        "program id:  {}",
        status
            .program_id
            .map_or("unknown".to_owned(), |id| id.to_string())
    );
    let _ = writeln!(out, "uptime:      {}s", status.uptime_secs);
    let _ = writeln!(
        out,
        "pins:        {} ({})",
        status.pin_dir,
        if status.reused_pins {
            "reused from the previous run"
        } else {
            "new"
        }
    );
    let _ = writeln!(out, "state file:  {}", status.state_file);
    let _ = writeln!(
        out,
        "entries:     {} allowlist, {} blocklist",
        status.allow_entries, status.block_entries
    );
    if status.interfaces.is_empty() {
        let _ = writeln!(out, "interfaces:  none (set xdp.interfaces in the config)");
    }
    for interface in &status.interfaces {
        let mode = match interface.mode {
            crate::config::AttachMode::Native => "native",
            crate::config::AttachMode::Generic => "generic (slow path; for tests and loopback)",
        };
        let _ = writeln!(out, "interface:   {} xdp {}", interface.name, mode);
    }
    let _ = writeln!(out, "maps:");
    for map in &status.maps {
        let _ = writeln!(
            out,
            "  {:<18} {:>9} / {:<9} ({:.1}%)",
            map.name,
            map.entries,
            map.capacity,
            map.entries as f64 * 100.0 / f64::from(map.capacity.max(1))
        );
    }
    out
}
