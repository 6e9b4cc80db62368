//! Per-request latency of the policy phases: authentication (a JWT signed RS256 or ES256, an
//! API key, a remembered Basic password), one Cedar decision on the test policy set, and a
//! ~1 KB JSON body through depth scan, parse and JSON Schema validation.
//! `cargo bench -p gateway-userspace --bench phases`.
use std::{
    collections::BTreeSet,
    hint::black_box,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use criterion::{Criterion, criterion_group, criterion_main};
use gateway_userspace::{
    auth::{
        AuthMethod, Authenticator, Identity, Method as Auth, SystemClock, apikeys::KeyStore, basic,
    },
    authz::{CedarPolicies, RequestFacts, RouteAuthz, TlsFacts},
    config::{
        Config,
        authz::{AuthzConfig, RouteAuthzConfig},
    },
    validate::{BodyContext, Validations},
};
use http::{HeaderMap, HeaderValue, Method, Uri, header};

fn testdata(module: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(module)
        .join("testdata")
        .join(name)
}

fn cedar(c: &mut Criterion) {
    let policies = CedarPolicies::from_config(&AuthzConfig {
        cedar_schema: Some(testdata("authz", "gateway.cedarschema")),
        cedar_policies: vec![testdata("authz", "orders.cedar")],
    })
    .unwrap_or_else(|e| panic!("bench policies: {e}"))
    .expect("policies configured");
    let route = RouteAuthz::new(
        "orders",
        &RouteAuthzConfig {
            cedar: true,
            ..RouteAuthzConfig::default()
        },
        Some(Arc::new(policies)),
    );
    let identity = Identity {
        principal: "alice".to_owned(),
        method: AuthMethod::Mtls,
        scopes: BTreeSet::from(["orders:read".to_owned(), "orders:write".to_owned()]),
        roles: BTreeSet::new(),
        claims: serde_json::json!({"tenant": "acme", "sub": "alice", "exp": 1_800_000_000})
            .as_object()
            .cloned()
            .expect("claims object"),
    };
    let method = Method::GET;
    let params = [("id".to_owned(), "42".to_owned())];
    let facts = RequestFacts {
        route: "orders",
        method: &method,
        path: "/orders/42",
        path_params: &params,
        operation: Some("getOrder"),
        source: Ipv4Addr::new(192, 0, 2, 10).into(),
        time: SystemTime::now(),
        tls: Some(TlsFacts {
            version: "TLSv1.3",
            sni: Some("api.example.com"),
            client_certificate: false,
        }),
    };
    route
        .authorize(Some(&identity), &facts)
        .unwrap_or_else(|e| panic!("the bench request must be permitted: {e}"));
    c.bench_function("cedar_authorize_permit_4_policies", |b| {
        b.iter(|| route.authorize(black_box(Some(&identity)), black_box(&facts)))
    });
}

fn schema(c: &mut Criterion) {
    let toml = format!(
        "[[routes]]\nname = \"orders\"\nupstream = \"u\"\n[routes.validate]\njson_schema = {:?}\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:1\"]\n",
        testdata("validate", "order.schema.json")
            .display()
            .to_string()
    );
    let config = Config::parse(&toml).unwrap_or_else(|e| panic!("bench config: {e}"));
    let validations = Validations::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    let route = validations.route("orders").expect("orders validates");
    let items: Vec<_> = (0..20)
        .map(
            |i| serde_json::json!({"sku": format!("SKU-{i:04}"), "qty": i + 1, "unit_price": 4.25}),
        )
        .collect();
    let body = serde_json::json!({
        "customer": {"id": 7, "email": "ann@example.com", "name": "Ann Example"},
        "items": items,
        "note": "leave at the door",
        "priority": "normal",
    })
    .to_string();
    assert!(
        (900..1300).contains(&body.len()),
        "the bench body should be about 1 KB, is {}",
        body.len()
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let uri: Uri = "/orders".parse().expect("uri");
    let operation = route
        .check_head(&Method::POST, &uri, &headers)
        .unwrap_or_else(|e| panic!("bench head: {e}"));
    let ctx = BodyContext::new(&headers, operation.as_ref());
    route
        .check_body(body.as_bytes(), &ctx)
        .unwrap_or_else(|e| panic!("the bench body must be valid: {e}"));
    c.bench_function("json_schema_validate_1kb_body", |b| {
        b.iter(|| route.check_body(black_box(body.as_bytes()), black_box(&ctx)))
    });
}

/// A token from the test issuer, signed with `key` (a private PEM under `auth/testdata`).
fn token(algorithm: jsonwebtoken::Algorithm, key: &str) -> String {
    let pem = std::fs::read(testdata("auth", key)).expect("test key");
    let key = match algorithm {
        jsonwebtoken::Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
    }
    .expect("a private key");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let claims = serde_json::json!({
        "iss": format!("https://{algorithm:?}.idp.test"),
        "aud": "orders",
        "sub": "alice",
        "scope": "orders:read orders:write",
        "iat": now,
        "exp": now + 3600,
    });
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, &key).expect("signed")
}

fn authenticate(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("gateway-bench-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench folder");
    let users = dir.join("basic-users");
    let hash = basic::hash_password(b"correct horse").expect("hash");
    std::fs::write(&users, format!("alice:{hash}\n")).expect("users file");
    let issuer = |algorithm: &str, pem: &str| {
        format!(
            "[[auth.jwt]]\nissuer = \"https://{algorithm}.idp.test\"\naudiences = [\"orders\"]\nalgorithms = [\"{algorithm}\"]\npem_file = {:?}\n",
            testdata("auth", pem).display().to_string()
        )
    };
    let config = Config::parse(&format!(
        "{}{}[auth.basic]\nusers_file = {:?}\n",
        issuer("RS256", "rsa-a.pub.pem"),
        issuer("ES256", "ec-a.pub.pem"),
        users.display().to_string()
    ))
    .unwrap_or_else(|e| panic!("bench config: {e}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let clock = Arc::new(SystemClock);
    let keys =
        Arc::new(KeyStore::open(&dir.join("api-keys.json"), clock.clone()).expect("key store"));
    let api_key = keys
        .create("svc-billing", &["orders:read".to_owned()], None)
        .expect("a key");
    let auth = runtime
        .block_on(Authenticator::new(
            &config.auth,
            Arc::clone(&keys),
            clock.clone(),
        ))
        .unwrap_or_else(|e| panic!("authenticator: {e}"));
    // The same, verifying every token in full: a token's first use.
    let mut uncached = config.auth.clone();
    uncached.verified_token_cache = 0;
    let auth_first_use = runtime
        .block_on(Authenticator::new(&uncached, Arc::clone(&keys), clock))
        .unwrap_or_else(|e| panic!("authenticator: {e}"));

    let bearer = |token: String| {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("header");
        headers.insert(header::AUTHORIZATION, value);
        headers
    };
    let mut api_key_headers = HeaderMap::new();
    api_key_headers.insert(
        "x-api-key",
        HeaderValue::from_str(api_key.secret.expose()).expect("header"),
    );
    let mut basic_headers = HeaderMap::new();
    basic_headers.insert(
        header::AUTHORIZATION,
        // alice:correct horse
        HeaderValue::from_static("Basic YWxpY2U6Y29ycmVjdCBob3JzZQ=="),
    );
    let rs256 = bearer(token(jsonwebtoken::Algorithm::RS256, "rsa-a.key.pem"));
    let es256 = bearer(token(jsonwebtoken::Algorithm::ES256, "ec-a.key.pem"));
    for (name, auth, methods, headers) in [
        (
            "authenticate_jwt_rs256_first_use",
            &auth_first_use,
            Auth::Jwt,
            rs256.clone(),
        ),
        (
            "authenticate_jwt_es256_first_use",
            &auth_first_use,
            Auth::Jwt,
            es256.clone(),
        ),
        ("authenticate_jwt_rs256_remembered", &auth, Auth::Jwt, rs256),
        ("authenticate_jwt_es256_remembered", &auth, Auth::Jwt, es256),
        ("authenticate_api_key", &auth, Auth::ApiKey, api_key_headers),
        (
            "authenticate_basic_remembered",
            &auth,
            Auth::Basic,
            basic_headers,
        ),
    ] {
        let methods = [methods];
        runtime
            .block_on(auth.authenticate(&methods, &headers, None))
            .unwrap_or_else(|e| panic!("{name}: the bench credential must verify: {e}"));
        c.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(auth.authenticate(black_box(&methods), black_box(&headers), None))
            })
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, authenticate, cedar, schema);
criterion_main!(benches);
