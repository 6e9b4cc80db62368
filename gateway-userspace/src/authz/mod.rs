//! The authorize phase: decides whether an authenticated (or anonymous) request may reach its
//! route, deny by default. A route's `authz` table names required scopes, roles and claim
//! values (`all_of` / `any_of`), and may hand the decision to the Cedar policies of `[authz]`
//! as well ([`cedar`]). Every rule present must permit the request; a Cedar request that no
//! policy permits is denied.
//!
//! How the pipeline calls it (phase 6, after authenticate, before validate's body checks):
//!
//! ```text
//! Authorizer::from_config(&config)?          once per config load or reload (compiles Cedar)
//! authorizer.route(&route.name)              None: the route has no `authz` table, skip
//!   .authorize(identity.as_ref(), &facts)    per request
//!     Ok(Decision)      go on; `decision.policies()` may go to the access log
//!     Err(AuthzDenied)  403; `denied.reason()` is the problem type's slug, never the detail
//! ```
//!
//! [`RequestFacts`] wants the route name, method, path (as forwarded), the path parameters and
//! operation id of the OpenAPI operation if the validate phase matched one
//! ([`crate::validate::RouteValidation::check_head`] needs no body, so it can run first), the
//! client's address, the time and the TLS facts. Decisions are logged here (target `authz`):
//! denials at `info` with the reason and deciding policy ids, permits at `debug`.
pub mod cedar;

use std::{net::IpAddr, sync::Arc, time::SystemTime};

pub use self::cedar::CedarPolicies;
use crate::{
    auth::Identity,
    config::{
        Config, ConfigError,
        authz::{ClaimRule, Requirement, RouteAuthzConfig},
    },
};

/// Every route's compiled rules, built from one config.
#[derive(Debug, Default)]
pub struct Authorizer {
    routes: std::collections::HashMap<String, RouteAuthz>,
}

impl Authorizer {
    /// Loads the Cedar files of `[authz]` (once, shared by every route) and each route's rules.
    pub fn from_config(config: &Config) -> Result<Authorizer, ConfigError> {
        let cedar = CedarPolicies::from_config(&config.authz)?.map(Arc::new);
        let mut routes = std::collections::HashMap::new();
        for route in &config.routes {
            if let Some(authz) = &route.authz {
                routes.insert(
                    route.name.clone(),
                    RouteAuthz::new(&route.name, authz, cedar.clone()),
                );
            }
        }
        Ok(Authorizer { routes })
    }

    /// The rules of route `name`; `None` when the route has no `authz` table.
    pub fn route(&self, name: &str) -> Option<&RouteAuthz> {
        self.routes.get(name)
    }
}

/// What the policies see of a request besides the identity.
#[derive(Clone, Debug)]
pub struct RequestFacts<'a> {
    /// The matched route's name: Cedar's resource is `Gateway::Route::"<route>"`.
    pub route: &'a str,
    /// Cedar's action is `Gateway::Action::"<METHOD>"`.
    pub method: &'a http::Method,
    /// The normalised path, as forwarded upstream.
    pub path: &'a str,
    /// Path parameters of the matched OpenAPI operation (name, decoded value), if any.
    pub path_params: &'a [(String, String)],
    /// The matched OpenAPI operation's `operationId`, if any.
    pub operation: Option<&'a str>,
    /// The client's address (the real peer, or the trusted proxy's client).
    pub source: IpAddr,
    pub time: SystemTime,
    /// `None` for plain HTTP.
    pub tls: Option<TlsFacts<'a>>,
}

/// The TLS session a request arrived on.
#[derive(Clone, Debug)]
pub struct TlsFacts<'a> {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: &'a str,
    pub sni: Option<&'a str>,
    /// Whether the client presented a certificate the listener verified.
    pub client_certificate: bool,
}

/// A permitted request: which rules and policies permitted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    policies: Vec<String>,
}

impl Decision {
    /// Ids of the Cedar policies that permitted the request (empty when the route does not
    /// use Cedar).
    pub fn policies(&self) -> &[String] {
        &self.policies
    }
}

/// Why a request was denied. [`AuthzDenied::reason`] is stable and safe to show; the
/// `Display` text is for operators (it names the missing scope or the policy).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct AuthzDenied {
    kind: DenyKind,
    policies: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum DenyKind {
    #[error("the route's rules need an authenticated identity")]
    Unauthenticated,
    #[error("missing scope(s): {0}")]
    MissingScope(String),
    #[error("missing role(s): {0}")]
    MissingRole(String),
    #[error("claim `{0}` lacks a required value")]
    Claim(String),
    #[error("forbidden by Cedar policy")]
    Forbidden,
    #[error("no Cedar policy permits the request")]
    NotPermitted,
    #[error("the request does not fit the Cedar schema: {0}")]
    Schema(String),
}

impl AuthzDenied {
    /// A stable, short reason for logs, metrics and the problem type.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            DenyKind::Unauthenticated => "unauthenticated",
            DenyKind::MissingScope(_) => "missing_scope",
            DenyKind::MissingRole(_) => "missing_role",
            DenyKind::Claim(_) => "claim_mismatch",
            DenyKind::Forbidden => "policy_forbids",
            DenyKind::NotPermitted => "no_policy_permits",
            DenyKind::Schema(_) => "policy_schema_mismatch",
        }
    }

    /// Ids of the Cedar policies that decided the denial: the `forbid`s that matched. Empty
    /// when no policy permitted (deny by default) or a route rule decided.
    pub fn policies(&self) -> &[String] {
        &self.policies
    }

    /// Always 403: the identity is known (or the route allows anonymous requests) but may not
    /// do this. Missing credentials are the authenticate phase's 401.
    pub fn status(&self) -> http::StatusCode {
        http::StatusCode::FORBIDDEN
    }

    fn rule(kind: DenyKind) -> AuthzDenied {
        AuthzDenied {
            kind,
            policies: Vec::new(),
        }
    }
}

/// One route's compiled rules.
#[derive(Debug)]
pub struct RouteAuthz {
    route: String,
    scopes: Requirement,
    roles: Requirement,
    claims: Vec<ClaimRule>,
    cedar: Option<Arc<CedarPolicies>>,
}

impl RouteAuthz {
    /// `cedar` is `[authz]`'s policy set; it is consulted only when the route says `cedar`.
    /// Config validation has checked that a route asking for Cedar has one.
    pub fn new(
        route: &str,
        config: &RouteAuthzConfig,
        cedar: Option<Arc<CedarPolicies>>,
    ) -> RouteAuthz {
        RouteAuthz {
            route: route.to_owned(),
            scopes: config.scopes.clone(),
            roles: config.roles.clone(),
            claims: config.claims.clone(),
            cedar: cedar.filter(|_| config.cedar),
        }
    }

    /// Decides one request and logs the decision. `identity` is `None` for anonymous requests
    /// on routes that allow them; scope, role and claim rules then deny, and Cedar sees a
    /// principal with `authenticated == false`.
    pub fn authorize(
        &self,
        identity: Option<&Identity>,
        facts: &RequestFacts<'_>,
    ) -> Result<Decision, AuthzDenied> {
        let result = self.decide(identity, facts);
        let principal = identity.map_or("", |i| i.principal.as_str());
        match &result {
            Ok(decision) => tracing::debug!(
                target: "authz",
                route = %self.route,
                principal,
                method = %facts.method,
                policies = ?decision.policies,
                "request permitted"
            ),
            Err(denied) => tracing::info!(
                target: "authz",
                route = %self.route,
                principal,
                method = %facts.method,
                reason = denied.reason(),
                policies = ?denied.policies,
                detail = %denied,
                "request denied"
            ),
        }
        result
    }

    fn decide(
        &self,
        identity: Option<&Identity>,
        facts: &RequestFacts<'_>,
    ) -> Result<Decision, AuthzDenied> {
        let has_rules =
            !self.scopes.is_empty() || !self.roles.is_empty() || !self.claims.is_empty();
        if has_rules {
            let identity = identity.ok_or_else(|| AuthzDenied::rule(DenyKind::Unauthenticated))?;
            if let Some(missing) = unmet(&self.scopes, |s| identity.scopes.contains(s)) {
                return Err(AuthzDenied::rule(DenyKind::MissingScope(missing)));
            }
            if let Some(missing) = unmet(&self.roles, |r| identity.roles.contains(r)) {
                return Err(AuthzDenied::rule(DenyKind::MissingRole(missing)));
            }
            for rule in &self.claims {
                if !claim_holds(identity.claims.get(&rule.name), rule) {
                    return Err(AuthzDenied::rule(DenyKind::Claim(rule.name.clone())));
                }
            }
        }
        match &self.cedar {
            Some(cedar) => cedar
                .authorize(identity, facts)
                .map(|policies| Decision { policies }),
            None => Ok(Decision {
                policies: Vec::new(),
            }),
        }
    }
}

/// The values of `requirement` that `held` does not satisfy, comma-separated, or `None` when
/// it is met.
fn unmet(requirement: &Requirement, held: impl Fn(&str) -> bool) -> Option<String> {
    let missing: Vec<&str> = requirement
        .all_of
        .iter()
        .map(String::as_str)
        .filter(|v| !held(v))
        .collect();
    if !missing.is_empty() {
        return Some(missing.join(", "));
    }
    if !requirement.any_of.is_empty() && !requirement.any_of.iter().any(|v| held(v)) {
        return Some(format!("one of {}", requirement.any_of.join(", ")));
    }
    None
}

/// Whether a claim carries the values a rule asks for (see [`ClaimRule`]).
fn claim_holds(claim: Option<&serde_json::Value>, rule: &ClaimRule) -> bool {
    let Some(claim) = claim else { return false };
    let held: Vec<String> = match claim {
        serde_json::Value::Array(items) => items.iter().filter_map(scalar_text).collect(),
        other => scalar_text(other).into_iter().collect(),
    };
    let has = |v: &String| held.contains(v);
    rule.all_of.iter().all(has) && (rule.any_of.is_empty() || rule.any_of.iter().any(has))
}

/// A scalar claim as text: strings as they are, numbers and booleans as JSON writes them.
/// Objects, arrays and null have no text and match nothing.
pub(crate) fn scalar_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::{collections::BTreeSet, net::Ipv4Addr, time::SystemTime};

    use super::{RequestFacts, TlsFacts};
    use crate::auth::{AuthMethod, Identity};

    /// An identity as the API key method would produce it, with claims for rule tests.
    pub(crate) fn identity(
        principal: &str,
        scopes: &[&str],
        roles: &[&str],
        claims: serde_json::Value,
    ) -> Identity {
        Identity {
            principal: principal.to_owned(),
            method: AuthMethod::Mtls,
            scopes: scopes
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<BTreeSet<_>>(),
            roles: roles
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<BTreeSet<_>>(),
            claims: match claims {
                serde_json::Value::Object(map) => map,
                other => panic!("test claims must be an object, not {other}"),
            },
        }
    }

    pub(crate) fn facts<'a>(
        route: &'a str,
        method: &'a http::Method,
        path_params: &'a [(String, String)],
    ) -> RequestFacts<'a> {
        RequestFacts {
            route,
            method,
            path: "/orders/42",
            path_params,
            operation: Some("getOrder"),
            source: Ipv4Addr::new(192, 0, 2, 10).into(),
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
            tls: Some(TlsFacts {
                version: "TLSv1.3",
                sni: Some("api.example.com"),
                client_certificate: false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    fn route(toml: &str) -> RouteAuthz {
        let config: RouteAuthzConfig =
            toml::from_str(toml).unwrap_or_else(|e| panic!("route authz config: {e}"));
        config
            .validate("routes[0].authz")
            .unwrap_or_else(|e| panic!("route authz config: {e}"));
        RouteAuthz::new("orders", &config, None)
    }

    fn get() -> http::Method {
        http::Method::GET
    }

    #[test]
    fn a_missing_scope_is_denied_and_named() {
        let authz = route("scopes = { all_of = [\"orders:read\", \"orders:write\"] }");
        let method = get();
        let facts = facts("orders", &method, &[]);
        let reader = identity("alice", &["orders:read"], &[], serde_json::json!({}));
        let denied = authz
            .authorize(Some(&reader), &facts)
            .expect_err("orders:write is missing");
        assert_eq!(denied.reason(), "missing_scope");
        assert_eq!(denied.status(), http::StatusCode::FORBIDDEN);
        assert!(denied.to_string().contains("orders:write"), "{denied}");
        let both = identity(
            "alice",
            &["orders:read", "orders:write"],
            &[],
            serde_json::json!({}),
        );
        let decision = authz
            .authorize(Some(&both), &facts)
            .unwrap_or_else(|e| panic!("both scopes held: {e}"));
        assert!(decision.policies().is_empty(), "{decision:?}");
    }

    #[test]
    fn anonymous_requests_fail_every_rule() {
        let authz = route("roles = { any_of = [\"admin\"] }");
        let method = get();
        let denied = authz
            .authorize(None, &facts("orders", &method, &[]))
            .expect_err("no identity");
        assert_eq!(denied.reason(), "unauthenticated");
    }

    #[test]
    fn any_of_needs_one_and_all_of_needs_every_value() {
        let any = route("roles = { any_of = [\"clerk\", \"admin\"] }");
        let all = route("roles = { all_of = [\"clerk\", \"admin\"] }");
        let method = get();
        let facts = facts("orders", &method, &[]);
        let clerk = identity("bob", &[], &["clerk"], serde_json::json!({}));
        let both = identity("carol", &[], &["clerk", "admin"], serde_json::json!({}));
        let nobody = identity("dave", &[], &["intern"], serde_json::json!({}));
        assert!(
            any.authorize(Some(&clerk), &facts).is_ok(),
            "any_of: one suffices"
        );
        assert!(
            any.authorize(Some(&nobody), &facts).is_err(),
            "any_of: none held"
        );
        let denied = all
            .authorize(Some(&clerk), &facts)
            .expect_err("all_of: admin missing");
        assert_eq!(denied.reason(), "missing_role");
        assert!(
            all.authorize(Some(&both), &facts).is_ok(),
            "all_of: both held"
        );
    }

    #[test]
    fn claim_values_match_strings_numbers_and_arrays() {
        let authz = route(
            "claims = [{ name = \"tenant\", any_of = [\"acme\", \"globex\"] }, { name = \"groups\", all_of = [\"a\", \"b\"] }, { name = \"level\", any_of = [\"3\"] }]",
        );
        let method = get();
        let facts = facts("orders", &method, &[]);
        let good = identity(
            "erin",
            &[],
            &[],
            serde_json::json!({"tenant": "acme", "groups": ["b", "a", "c"], "level": 3}),
        );
        authz
            .authorize(Some(&good), &facts)
            .unwrap_or_else(|e| panic!("claims match: {e}"));
        let cases = [
            (
                serde_json::json!({"tenant": "initech", "groups": ["a", "b"], "level": 3}),
                "tenant",
            ),
            (
                serde_json::json!({"tenant": "acme", "groups": ["a"], "level": 3}),
                "groups",
            ),
            (
                serde_json::json!({"tenant": "acme", "groups": ["a", "b"], "level": "4"}),
                "level",
            ),
            (
                serde_json::json!({"groups": ["a", "b"], "level": 3}),
                "tenant",
            ),
            (
                serde_json::json!({"tenant": {"name": "acme"}, "groups": ["a", "b"], "level": 3}),
                "tenant",
            ),
        ];
        for (claims, failing) in cases {
            let who = identity("erin", &[], &[], claims.clone());
            let Err(denied) = authz.authorize(Some(&who), &facts) else {
                panic!("claims {claims} must be denied");
            };
            assert_eq!(denied.reason(), "claim_mismatch", "{claims}");
            assert!(denied.to_string().contains(failing), "{claims}: {denied}");
        }
    }
}
