//! `gateway keys create|list|revoke`: API keys through the admin socket. `create` prints the key
//! alone on stdout (so it can be piped into a secret store) and everything else on stderr.
use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{Exit, Failure, args::KeysCommand};
use crate::{
    admin::{
        client::AdminClient,
        protocol::{Request, Response},
    },
    auth::apikeys::{self, KeyId, KeyView},
};

/// Runs a keys command. Arguments are checked before `connect` is called, so a typo is reported
/// as such (exit 2) even when the daemon is down.
pub(super) fn run(
    connect: impl FnOnce() -> Result<AdminClient, Failure>,
    command: KeysCommand,
) -> Result<Exit, Failure> {
    match command {
        KeysCommand::Create { owner, scopes, ttl } => {
            if let Err(error) = apikeys::validate(&owner, &scopes) {
                eprintln!("error: {error}");
                return Ok(Exit::Usage);
            }
            let request = Request::KeysCreate {
                owner,
                scopes,
                ttl_ms: ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            };
            let Response::KeyCreated { key, secret } = connect()?.call(&request)? else {
                return Err(unexpected());
            };
            println!("{secret}");
            eprintln!(
                "created API key {} for `{}` (scopes: {}; {}). This is the only time the key is shown: store it now.",
                key.key_id,
                key.owner,
                scopes_text(&key),
                expiry(&key, SystemTime::now()),
            );
            Ok(Exit::Success)
        }
        KeysCommand::List(args) => {
            let Response::Keys { keys } = connect()?.call(&Request::KeysList)? else {
                return Err(unexpected());
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                print!("{}", render_table(&keys, SystemTime::now()));
            }
            Ok(Exit::Success)
        }
        KeysCommand::Revoke { key_id } => {
            if let Err(error) = KeyId::try_from(key_id.clone()) {
                eprintln!("error: {error}");
                return Ok(Exit::Usage);
            }
            let Response::KeyRevoked { key } = connect()?.call(&Request::KeysRevoke { key_id })?
            else {
                return Err(unexpected());
            };
            println!(
                "revoked API key {} of `{}`; requests with it are refused from now on",
                key.key_id, key.owner
            );
            Ok(Exit::Success)
        }
    }
}

fn unexpected() -> Failure {
    anyhow::anyhow!(
        "the daemon answered with an unexpected response; are the CLI and daemon the same version?"
    )
    .into()
}

fn scopes_text(key: &KeyView) -> String {
    if key.scopes.is_empty() {
        "none".to_owned()
    } else {
        key.scopes.join(",")
    }
}

fn expiry(key: &KeyView, now: SystemTime) -> String {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    match key.expires_unix_ms {
        None => "never expires".to_owned(),
        Some(at) if at <= now_ms => "expired".to_owned(),
        Some(at) => format!(
            "expires in {}",
            humantime::format_duration(Duration::from_secs((at - now_ms) / 1000))
        ),
    }
}

fn render_table(keys: &[KeyView], now: SystemTime) -> String {
    let mut out = format!(
        "{:<16}  {:<24} {:<8} {:<22} SCOPES\n",
        "KEY ID", "OWNER", "STATUS", "EXPIRY"
    );
    for key in keys {
        let _ = writeln!(
            out,
            "{:<16}  {:<24} {:<8} {:<22} {}",
            key.key_id,
            key.owner,
            key.status.name(),
            expiry(key, now),
            scopes_text(key)
        );
    }
    let _ = writeln!(
        out,
        "{} key{}",
        keys.len(),
        if keys.len() == 1 { "" } else { "s" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::apikeys::KeyStatus;

    #[test]
    fn the_table_shows_status_and_expiry_but_no_secret() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let keys = [
            KeyView {
                key_id: KeyId::for_tests("0123456789abcdef"),
                owner: "svc-billing".into(),
                scopes: vec!["orders:read".into()],
                created_unix_ms: 1_799_000_000_000,
                expires_unix_ms: Some(1_800_000_000_000 + 3_600_000),
                revoked_unix_ms: None,
                status: KeyStatus::Active,
            },
            KeyView {
                key_id: KeyId::for_tests("fedcba9876543210"),
                owner: "ci".into(),
                scopes: vec![],
                created_unix_ms: 1,
                expires_unix_ms: None,
                revoked_unix_ms: Some(2),
                status: KeyStatus::Revoked,
            },
        ];
        let table = render_table(&keys, now);
        assert!(table.contains("0123456789abcdef  svc-billing"), "{table}");
        assert!(table.contains("expires in 1h"), "{table}");
        assert!(table.contains("revoked"), "{table}");
        assert!(table.ends_with("2 keys\n"), "{table}");
    }
}
