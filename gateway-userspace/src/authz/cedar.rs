//! Fine-grained authorization with Cedar: the `[authz]` policy files, validated against the
//! operator's Cedar schema at load, and the mapping from a request to a Cedar request.
//!
//! The entity model the schema must declare (namespace `Gateway`; `testdata/gateway.cedarschema`
//! is a complete example):
//!
//! ```text
//! principal  Gateway::Principal::"<identity principal>"   ("" when anonymous)
//!              authenticated: Bool, auth_method: String ("jwt", "api_key", "mtls", "none"),
//!              scopes: Set<String>, roles: Set<String>,
//!              tags String: the token's scalar claims (numbers and booleans as JSON text)
//! action     Gateway::Action::"<HTTP method>"            (declare the methods policies use)
//! resource   Gateway::Route::"<route name>"
//!              path: String, operation?: String (the OpenAPI operationId),
//!              tags String: the path parameters
//! context    source_ip: ipaddr, time: Long (Unix seconds), tls: Bool,
//!              tls_version?: String, sni?: String, client_certificate: Bool
//! ```
//!
//! Claims are tags rather than attributes because their names are the token issuer's, not the
//! schema's: a policy asks `principal.hasTag("tenant") && principal.getTag("tenant") == "acme"`.
//! A method the schema does not declare as an action cannot be permitted (deny by default).
use std::{collections::HashSet, path::Path, str::FromStr as _, time::UNIX_EPOCH};

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use super::{AuthzDenied, DenyKind, RequestFacts, scalar_text};
use crate::{
    auth::Identity,
    config::{ConfigError, authz::AuthzConfig},
};

/// The validated policy set of `[authz]` and the schema requests are checked against.
#[derive(Debug)]
pub struct CedarPolicies {
    policies: PolicySet,
    schema: Schema,
    authorizer: Authorizer,
    /// The schema's action entities (and their groups), built once: every request needs them.
    actions: Entities,
    principal_type: EntityTypeName,
    route_type: EntityTypeName,
    action_type: EntityTypeName,
    /// `ip("...")` values of recent sources: building one makes Cedar parse the extension
    /// function's name, which cost as much as the rest of the request context together.
    source_ips: moka::sync::Cache<std::net::IpAddr, RestrictedExpression>,
}

/// Source addresses whose Cedar `ip` value is kept.
const SOURCE_IP_CACHE: u64 = 10_000;

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

fn read(key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| {
        invalid(
            key,
            format!("cannot read file `{}`: {error}", path.display()),
        )
    })
}

impl CedarPolicies {
    /// Loads `[authz]`: `None` when it names no policies. Errors name the config key of the
    /// file at fault and, for policies, the policy id.
    pub fn from_config(config: &AuthzConfig) -> Result<Option<CedarPolicies>, ConfigError> {
        let Some(schema_path) = &config.cedar_schema else {
            if config.cedar_policies.is_empty() {
                return Ok(None);
            }
            return Err(invalid(
                "authz.cedar_schema",
                "`cedar_policies` are validated against a schema; name the Cedar schema file",
            ));
        };
        if config.cedar_policies.is_empty() {
            return Err(invalid(
                "authz.cedar_policies",
                "a schema without policies would deny every request; list the policy files",
            ));
        }
        let schema_text = read("authz.cedar_schema", schema_path)?;
        let (schema, _warnings) = Schema::from_cedarschema_str(&schema_text).map_err(|error| {
            invalid(
                "authz.cedar_schema",
                format!(
                    "`{}` is not a valid Cedar schema: {error}",
                    schema_path.display()
                ),
            )
        })?;
        let mut policies = PolicySet::new();
        for (i, path) in config.cedar_policies.iter().enumerate() {
            let key = format!("authz.cedar_policies[{i}]");
            add_file(&mut policies, &key, path, &read(&key, path)?)?;
        }
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let errors: Vec<String> = result
                .validation_errors()
                .map(|e| format!("policy `{}`: {e}", e.policy_id()))
                .collect();
            return Err(invalid(
                "authz.cedar_policies",
                format!(
                    "policies do not validate against the schema `{}`: {}",
                    schema_path.display(),
                    errors.join("; ")
                ),
            ));
        }
        let name = |n: &str| {
            EntityTypeName::from_str(n).map_err(|e| invalid("authz.cedar_schema", e.to_string()))
        };
        let actions = schema.action_entities().map_err(|error| {
            invalid(
                "authz.cedar_schema",
                format!("`{}`: {error}", schema_path.display()),
            )
        })?;
        let cedar = CedarPolicies {
            policies,
            schema,
            actions,
            authorizer: Authorizer::new(),
            principal_type: name("Gateway::Principal")?,
            route_type: name("Gateway::Route")?,
            action_type: name("Gateway::Action")?,
            source_ips: moka::sync::Cache::new(SOURCE_IP_CACHE),
        };
        cedar.check_entity_model(schema_path)?;
        Ok(Some(cedar))
    }

    /// Builds the entities of an anonymous request against the schema, so a schema that does
    /// not declare the gateway's entity model fails at load, not on every request.
    fn check_entity_model(&self, schema_path: &Path) -> Result<(), ConfigError> {
        let method = http::Method::GET;
        let facts = RequestFacts {
            route: "probe",
            method: &method,
            path: "/",
            path_params: &[],
            operation: None,
            source: std::net::Ipv4Addr::LOCALHOST.into(),
            time: UNIX_EPOCH,
            tls: None,
        };
        self.entities(None, &facts).map(drop).map_err(|error| {
            invalid(
                "authz.cedar_schema",
                format!(
                    "`{}` does not declare the gateway's entity model (`Gateway::Principal`, `Gateway::Route`; see the `authz::cedar` docs): {error}",
                    schema_path.display()
                ),
            )
        })?;
        let Some(action) = self.schema.actions().next() else {
            return Err(invalid(
                "authz.cedar_schema",
                format!(
                    "`{}` declares no action; declare the HTTP methods as `Gateway::Action`s",
                    schema_path.display()
                ),
            ));
        };
        let action = action.clone();
        self.request(action, None, &facts)
            .map(drop)
            .map_err(|error| {
                invalid(
                    "authz.cedar_schema",
                    format!(
                        "`{}` does not declare the gateway's context or entity types for its actions (see the `authz::cedar` docs): {error}",
                        schema_path.display()
                    ),
                )
            })
    }

    /// Evaluates the policies: the ids of the permitting policies, or the denial with the ids
    /// of the `forbid`s that decided it.
    pub(super) fn authorize(
        &self,
        identity: Option<&Identity>,
        facts: &RequestFacts<'_>,
    ) -> Result<Vec<String>, AuthzDenied> {
        let schema_error = |error: String| AuthzDenied {
            kind: DenyKind::Schema(error),
            policies: Vec::new(),
        };
        let entities = self
            .entities(identity, facts)
            .map_err(|e| schema_error(e.to_string()))?;
        let action = self.uid(&self.action_type, facts.method.as_str());
        let request = self
            .request(action, identity, facts)
            .map_err(|e| schema_error(e.to_string()))?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.policies, &entities);
        for error in response.diagnostics().errors() {
            // A policy that errors is skipped (it neither permits nor forbids); say which.
            tracing::warn!(target: "authz", route = facts.route, %error, "Cedar policy failed to evaluate");
        }
        let policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        match response.decision() {
            Decision::Allow => Ok(policies),
            Decision::Deny if policies.is_empty() => Err(AuthzDenied {
                kind: DenyKind::NotPermitted,
                policies,
            }),
            Decision::Deny => Err(AuthzDenied {
                kind: DenyKind::Forbidden,
                policies,
            }),
        }
    }

    fn uid(&self, kind: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(kind.clone(), EntityId::new(id))
    }

    fn principal_uid(&self, identity: Option<&Identity>) -> EntityUid {
        self.uid(
            &self.principal_type,
            identity.map_or("", |i| i.principal.as_str()),
        )
    }

    fn entities(
        &self,
        identity: Option<&Identity>,
        facts: &RequestFacts<'_>,
    ) -> Result<Entities, Box<dyn std::error::Error>> {
        let strings = |values: &mut dyn Iterator<Item = &String>| {
            RestrictedExpression::new_set(
                values.map(|v| RestrictedExpression::new_string(v.clone())),
            )
        };
        let empty = std::collections::BTreeSet::new();
        let principal = Entity::new_with_tags(
            self.principal_uid(identity),
            [
                (
                    "authenticated".to_owned(),
                    RestrictedExpression::new_bool(identity.is_some()),
                ),
                (
                    "auth_method".to_owned(),
                    RestrictedExpression::new_string(
                        identity.map_or("none", |i| i.method.name()).to_owned(),
                    ),
                ),
                (
                    "scopes".to_owned(),
                    strings(&mut identity.map_or(&empty, |i| &i.scopes).iter()),
                ),
                (
                    "roles".to_owned(),
                    strings(&mut identity.map_or(&empty, |i| &i.roles).iter()),
                ),
            ],
            HashSet::new(),
            identity.into_iter().flat_map(|i| {
                i.claims.iter().filter_map(|(name, value)| {
                    scalar_text(value)
                        .map(|text| (name.clone(), RestrictedExpression::new_string(text)))
                })
            }),
        )?;
        let mut route_attrs = vec![(
            "path".to_owned(),
            RestrictedExpression::new_string(facts.path.to_owned()),
        )];
        if let Some(operation) = facts.operation {
            route_attrs.push((
                "operation".to_owned(),
                RestrictedExpression::new_string(operation.to_owned()),
            ));
        }
        let route = Entity::new_with_tags(
            self.uid(&self.route_type, facts.route),
            route_attrs,
            HashSet::new(),
            facts.path_params.iter().map(|(name, value)| {
                (
                    name.clone(),
                    RestrictedExpression::new_string(value.clone()),
                )
            }),
        )?;
        // Still checked against the schema: a claim or parameter can never reach a policy in a
        // shape the validator did not type-check.
        Ok(self
            .actions
            .clone()
            .add_entities([principal, route], Some(&self.schema))?)
    }

    fn request(
        &self,
        action: EntityUid,
        identity: Option<&Identity>,
        facts: &RequestFacts<'_>,
    ) -> Result<Request, Box<dyn std::error::Error>> {
        let time = facts
            .time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let mut context = vec![
            (
                "source_ip".to_owned(),
                self.source_ips.get_with(facts.source, || {
                    RestrictedExpression::new_ip(facts.source.to_string())
                }),
            ),
            ("time".to_owned(), RestrictedExpression::new_long(time)),
            (
                "tls".to_owned(),
                RestrictedExpression::new_bool(facts.tls.is_some()),
            ),
            (
                "client_certificate".to_owned(),
                RestrictedExpression::new_bool(
                    facts.tls.as_ref().is_some_and(|t| t.client_certificate),
                ),
            ),
        ];
        if let Some(tls) = &facts.tls {
            context.push((
                "tls_version".to_owned(),
                RestrictedExpression::new_string(tls.version.to_owned()),
            ));
            if let Some(sni) = tls.sni {
                context.push((
                    "sni".to_owned(),
                    RestrictedExpression::new_string(sni.to_owned()),
                ));
            }
        }
        let context = Context::from_pairs(context)?;
        Ok(Request::new(
            self.principal_uid(identity),
            action,
            self.uid(&self.route_type, facts.route),
            context,
            Some(&self.schema),
        )?)
    }
}

/// Parses one policy file into `set`, giving each policy its `@id` annotation or
/// `<file name>#<index>` as id. Templates are refused: nothing links them.
fn add_file(set: &mut PolicySet, key: &str, path: &Path, text: &str) -> Result<(), ConfigError> {
    let parsed = PolicySet::from_str(text).map_err(|error| {
        invalid(
            key,
            format!(
                "`{}` is not valid Cedar: {error}; check the policy syntax",
                path.display()
            ),
        )
    })?;
    if parsed.templates().next().is_some() {
        return Err(invalid(
            key,
            format!(
                "`{}` holds a policy template; the gateway links none, write plain policies",
                path.display()
            ),
        ));
    }
    let file = path.file_name().map_or_else(
        || path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    );
    // Policies come back in no particular order; sort by source position for stable indices.
    let mut policies: Vec<_> = parsed.policies().collect();
    policies.sort_by_key(|p| {
        p.id()
            .to_string()
            .strip_prefix("policy")
            .and_then(|n| n.parse::<usize>().ok())
    });
    for (index, policy) in policies.into_iter().enumerate() {
        let id = policy
            .annotation("id")
            .map_or_else(|| format!("{file}#{index}"), str::to_owned);
        let renamed = policy.new_id(PolicyId::new(&id));
        set.add(renamed).map_err(|_| {
            invalid(
                key,
                format!(
                    "policy id `{id}` in `{}` is used twice; decisions are logged by id, so make `@id`s unique",
                    path.display()
                ),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        authz::{RouteAuthz, testing::*},
        config::authz::RouteAuthzConfig,
    };

    fn testdata(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/authz/testdata")
            .join(name)
    }

    fn load(policies: &[&str]) -> Result<Option<CedarPolicies>, ConfigError> {
        CedarPolicies::from_config(&AuthzConfig {
            cedar_schema: Some(testdata("gateway.cedarschema")),
            cedar_policies: policies.iter().map(|p| testdata(p)).collect(),
        })
    }

    fn route(cedar: CedarPolicies) -> RouteAuthz {
        let config = RouteAuthzConfig {
            cedar: true,
            ..RouteAuthzConfig::default()
        };
        RouteAuthz::new("orders", &config, Some(Arc::new(cedar)))
    }

    #[test]
    fn cedar_permits_and_forbids_and_names_the_deciding_policy() {
        let authz = route(
            load(&["orders.cedar"])
                .unwrap_or_else(|e| panic!("policies load: {e}"))
                .expect("policies configured"),
        );
        let params = [("id".to_owned(), "42".to_owned())];
        let get = http::Method::GET;
        let delete = http::Method::DELETE;
        let reader = identity(
            "alice",
            &["orders:read"],
            &[],
            serde_json::json!({"tenant": "acme"}),
        );
        let decision = authz
            .authorize(Some(&reader), &facts("orders", &get, &params))
            .unwrap_or_else(|e| panic!("readers may GET: {e}"));
        assert_eq!(decision.policies(), ["orders-read"]);

        // The explicit forbid decides, and is named.
        let other_tenant = identity(
            "mallory",
            &["orders:read"],
            &[],
            serde_json::json!({"tenant": "globex"}),
        );
        let denied = authz
            .authorize(Some(&other_tenant), &facts("orders", &get, &params))
            .expect_err("only tenant acme");
        assert_eq!(denied.reason(), "policy_forbids");
        assert_eq!(denied.policies(), ["tenant-acme-only"]);

        // No permit for DELETE: deny by default, with no deciding policy.
        let denied = authz
            .authorize(Some(&reader), &facts("orders", &delete, &params))
            .expect_err("nobody may DELETE");
        assert_eq!(denied.reason(), "no_policy_permits");
        assert!(denied.policies().is_empty(), "{denied:?}");

        // Anonymous callers are principals too, and permitted nothing here.
        let denied = authz
            .authorize(None, &facts("orders", &get, &params))
            .expect_err("anonymous");
        assert_eq!(denied.reason(), "no_policy_permits");

        // A method the schema does not declare cannot be permitted.
        let purge = http::Method::from_bytes(b"PURGE").expect("method");
        let denied = authz
            .authorize(Some(&reader), &facts("orders", &purge, &params))
            .expect_err("undeclared action");
        assert_eq!(denied.reason(), "policy_schema_mismatch");
    }

    #[test]
    fn context_and_path_parameters_reach_the_policies() {
        let authz = route(
            load(&["orders.cedar"])
                .unwrap_or_else(|e| panic!("policies load: {e}"))
                .expect("policies configured"),
        );
        let admin = identity("root", &[], &["admin"], serde_json::json!({}));
        let put = http::Method::PUT;
        let params = [("id".to_owned(), "42".to_owned())];
        let decision = authz
            .authorize(Some(&admin), &facts("orders", &put, &params))
            .unwrap_or_else(|e| panic!("admins may PUT over TLS from 192.0.2.0/24: {e}"));
        assert_eq!(decision.policies(), ["admin-put"]);
        let mut plain = facts("orders", &put, &params);
        plain.tls = None;
        assert!(authz.authorize(Some(&admin), &plain).is_err(), "no TLS");
        let mut outside = facts("orders", &put, &params);
        outside.source = std::net::Ipv4Addr::new(203, 0, 113, 1).into();
        assert!(
            authz.authorize(Some(&admin), &outside).is_err(),
            "outside the network"
        );
        let locked = [("id".to_owned(), "0".to_owned())];
        assert!(
            authz
                .authorize(Some(&admin), &facts("orders", &put, &locked))
                .is_err(),
            "order 0 is locked"
        );
    }

    #[test]
    fn routes_get_their_rules_from_the_config_file() {
        let toml = format!(
            "[authz]\ncedar_schema = {:?}\ncedar_policies = [{:?}]\n\n[[routes]]\nname = \"orders\"\nupstream = \"u\"\n[routes.authz]\nscopes = {{ all_of = [\"orders:read\"] }}\ncedar = true\n\n[[routes]]\nname = \"open\"\nupstream = \"u\"\n\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n",
            testdata("gateway.cedarschema").display().to_string(),
            testdata("orders.cedar").display().to_string(),
        );
        let config = crate::config::Config::parse(&toml).unwrap_or_else(|e| panic!("{e}"));
        let authorizer =
            crate::authz::Authorizer::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            authorizer.route("open").is_none(),
            "no authz table, no phase"
        );
        let orders = authorizer.route("orders").expect("orders has rules");
        let get = http::Method::GET;
        let reader = identity(
            "alice",
            &["orders:read"],
            &[],
            serde_json::json!({"tenant": "acme"}),
        );
        let decision = orders
            .authorize(Some(&reader), &facts("orders", &get, &[]))
            .unwrap_or_else(|e| panic!("scope held and a policy permits: {e}"));
        assert_eq!(decision.policies(), ["orders-read"]);
        // The route rule decides first: no Cedar policy is named.
        let nobody = identity("bob", &[], &[], serde_json::json!({"tenant": "acme"}));
        let denied = orders
            .authorize(Some(&nobody), &facts("orders", &get, &[]))
            .expect_err("scope missing");
        assert_eq!(denied.reason(), "missing_scope");
        assert!(denied.policies().is_empty(), "{denied:?}");
    }

    #[test]
    fn policies_that_do_not_fit_the_schema_are_refused_at_load() {
        let Err(error) = load(&["orders.cedar", "invalid.cedar"]) else {
            panic!("a policy reading an undeclared attribute must be refused");
        };
        let message = error.to_string();
        assert!(
            message.contains("`authz.cedar_policies`")
                && message.contains("typo-attribute")
                && message.contains("do not validate against the schema"),
            "{message}"
        );
    }

    #[test]
    fn broken_files_name_their_key() {
        let dir = crate::auth::testing::temp_dir("cedar-broken");
        let broken = dir.join("broken.cedar");
        std::fs::write(&broken, "permit(principal,, action, resource);")
            .unwrap_or_else(|e| panic!("write: {e}"));
        let Err(error) = CedarPolicies::from_config(&AuthzConfig {
            cedar_schema: Some(testdata("gateway.cedarschema")),
            cedar_policies: vec![testdata("orders.cedar"), broken],
        }) else {
            panic!("a syntax error must be refused");
        };
        let message = error.to_string();
        assert!(
            message.contains("`authz.cedar_policies[1]`") && message.contains("not valid Cedar"),
            "{message}"
        );
        let Err(error) = CedarPolicies::from_config(&AuthzConfig {
            cedar_schema: Some(dir.join("missing.cedarschema")),
            cedar_policies: vec![testdata("orders.cedar")],
        }) else {
            panic!("a missing schema must be refused");
        };
        assert!(
            error
                .to_string()
                .contains("`authz.cedar_schema`: cannot read file"),
            "{error}"
        );
        let duplicate = dir.join("duplicate.cedar");
        std::fs::write(
            &duplicate,
            "@id(\"orders-read\")\npermit(principal, action, resource);",
        )
        .unwrap_or_else(|e| panic!("write: {e}"));
        let Err(error) = load(&["orders.cedar", duplicate.to_str().expect("utf-8 path")]) else {
            panic!("duplicate ids must be refused");
        };
        assert!(error.to_string().contains("used twice"), "{error}");
    }

    #[test]
    fn a_schema_without_the_entity_model_is_refused() {
        let dir = crate::auth::testing::temp_dir("cedar-model");
        let schema = dir.join("other.cedarschema");
        std::fs::write(
            &schema,
            "namespace Gateway { entity Principal; entity Route; action \"GET\" appliesTo { principal: Principal, resource: Route }; }",
        )
        .unwrap_or_else(|e| panic!("write: {e}"));
        let policy = dir.join("p.cedar");
        std::fs::write(&policy, "permit(principal, action, resource);")
            .unwrap_or_else(|e| panic!("write: {e}"));
        let Err(error) = CedarPolicies::from_config(&AuthzConfig {
            cedar_schema: Some(schema),
            cedar_policies: vec![policy],
        }) else {
            panic!("a schema without the gateway's attributes must be refused");
        };
        assert!(error.to_string().contains("entity model"), "{error}");
    }
}
