//! The authorize phase's part of the config file: the top-level `[authz]` table (the Cedar
//! schema and policy files) and each route's `authz` table (required scopes, roles, claim
//! values, and whether the Cedar policies decide too). Loading and compiling happen in
//! [`crate::authz`]; this module checks shapes and references and names the key that is wrong.
//!
//! ```toml
//! [authz]
//! cedar_schema = "/etc/gateway/gateway.cedarschema"
//! cedar_policies = ["/etc/gateway/orders.cedar"]
//!
//! [[routes]]
//! name = "orders"
//! # ...
//! [routes.authz]
//! scopes = { all_of = ["orders:read"] }
//! roles = { any_of = ["clerk", "admin"] }
//! claims = [{ name = "tenant", any_of = ["acme"] }]
//! cedar = true
//! ```
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, RouteConfig, invalid};

/// `[authz]`: the Cedar policies that routes with `authz.cedar = true` are decided by. The
/// files are read, parsed and validated against the schema whenever the config is loaded, so a
/// reload picks up edited policies and a broken policy file is refused with the config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzConfig {
    /// A Cedar schema (Cedar schema syntax) declaring the gateway's entity model: see
    /// [`crate::authz`] for the entity types and context it must declare. Required with
    /// `cedar_policies`.
    pub cedar_schema: Option<PathBuf>,
    /// Cedar policy files. A policy's id is its `@id("...")` annotation, else
    /// `<file name>#<index>`; ids must be unique, since decisions are logged by id.
    #[serde(default)]
    pub cedar_policies: Vec<PathBuf>,
}

/// A route's authorization rules. Every rule present must hold (deny by default); a table with
/// no rule at all is refused, so an `authz` table never silently allows everything.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthzConfig {
    /// Scopes the identity must hold.
    #[serde(default)]
    pub scopes: Requirement,
    /// Roles the identity must hold.
    #[serde(default)]
    pub roles: Requirement,
    /// Claim values the identity's token must carry.
    #[serde(default)]
    pub claims: Vec<ClaimRule>,
    /// Also ask the `[authz]` Cedar policies; a request none of them permits is denied.
    #[serde(default)]
    pub cedar: bool,
}

/// `all_of`: every value must be present; `any_of`: at least one. Both may be set.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    #[serde(default)]
    pub all_of: Vec<String>,
    #[serde(default)]
    pub any_of: Vec<String>,
}

impl Requirement {
    pub fn is_empty(&self) -> bool {
        self.all_of.is_empty() && self.any_of.is_empty()
    }
}

/// A rule on one top-level claim. A string claim matches a listed value by equality, a number
/// or boolean by its JSON text (`42`, `true`); an array claim holds the values among its
/// elements. `any_of`: one listed value is held; `all_of`: every listed value is held.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRule {
    pub name: String,
    #[serde(default)]
    pub all_of: Vec<String>,
    #[serde(default)]
    pub any_of: Vec<String>,
}

impl RouteAuthzConfig {
    /// Shape checks of one route's table; `key` is `routes[i].authz`.
    pub(crate) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.scopes.is_empty() && self.roles.is_empty() && self.claims.is_empty() && !self.cedar
        {
            return Err(invalid(
                key,
                "names no rule; add `scopes`, `roles`, `claims` or `cedar = true`, or remove the table",
            ));
        }
        for (field, requirement) in [("scopes", &self.scopes), ("roles", &self.roles)] {
            for (list, values) in [
                ("all_of", &requirement.all_of),
                ("any_of", &requirement.any_of),
            ] {
                if let Some(j) = values.iter().position(|v| v.trim().is_empty()) {
                    return Err(invalid(
                        &format!("{key}.{field}.{list}[{j}]"),
                        "must not be empty",
                    ));
                }
            }
        }
        for (j, claim) in self.claims.iter().enumerate() {
            let claim_key = format!("{key}.claims[{j}]");
            if claim.name.is_empty() {
                return Err(invalid(&format!("{claim_key}.name"), "must not be empty"));
            }
            if claim.all_of.is_empty() && claim.any_of.is_empty() {
                return Err(invalid(
                    &claim_key,
                    format!(
                        "claim `{}` lists no value; set `any_of` or `all_of`",
                        claim.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks `[authz]` (loading and validating the Cedar files) and that every route asking for
/// Cedar has policies to ask.
pub(super) fn validate(authz: &AuthzConfig, routes: &[RouteConfig]) -> Result<(), ConfigError> {
    crate::authz::CedarPolicies::from_config(authz)?;
    if authz.cedar_policies.is_empty()
        && let Some(i) = routes
            .iter()
            .position(|r| r.authz.as_ref().is_some_and(|a| a.cedar))
    {
        return Err(invalid(
            &format!("routes[{i}].authz.cedar"),
            "no Cedar policies are configured; list them in `[authz] cedar_policies` (with `cedar_schema`)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn route(authz: &str) -> String {
        format!(
            "[[routes]]\nname = \"r\"\nupstream = \"u\"\n[routes.authz]\n{authz}\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n"
        )
    }

    fn error(toml: &str) -> String {
        match Config::parse(toml) {
            Ok(_) => panic!("config should be refused:\n{toml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_empty_authz_table_is_refused() {
        let message = error(&route(""));
        assert!(
            message.contains("`routes[0].authz`") && message.contains("names no rule"),
            "{message}"
        );
    }

    #[test]
    fn claim_rules_need_values_and_cedar_needs_policies() {
        let message = error(&route("claims = [{ name = \"tenant\" }]"));
        assert!(message.contains("`routes[0].authz.claims[0]`"), "{message}");
        let message = error(&route("cedar = true"));
        assert!(
            message.contains("`routes[0].authz.cedar`") && message.contains("cedar_policies"),
            "{message}"
        );
    }

    #[test]
    fn a_route_with_scopes_parses() {
        let config = Config::parse(&route("scopes = { all_of = [\"orders:read\"] }"))
            .unwrap_or_else(|e| panic!("config: {e}"));
        let authz = config.routes[0].authz.as_ref().expect("authz table");
        assert_eq!(authz.scopes.all_of, ["orders:read"]);
    }
}
