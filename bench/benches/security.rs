//! Criterion benches of the security hot paths: JWT signature checks by algorithm (what a token
//! not yet in a worker's cache costs) and an AuthorizationPolicy verdict over 20 rules.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use keel_config::authz::{compile_policy, Authz, Connection, HttpRequest};
use keel_config::jwt::{base64url_encode, EcCurve, Jwk, JwkKey, Jwks, JwtProvider, KeySource};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};

fn provider(jwks: &Jwks) -> JwtProvider {
    let keys = KeySource::Inline(Arc::new(jwks.clone()));
    JwtProvider::new("https://issuer.bench", vec!["bench".into()], keys)
}

fn token(alg: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let header = format!(r#"{{"alg":"{alg}"}}"#);
    let claims = r#"{"iss":"https://issuer.bench","sub":"wrk","aud":"bench","exp":4000000000,"groups":["load"]}"#;
    let input = format!(
        "{}.{}",
        base64url_encode(header.as_bytes()),
        base64url_encode(claims.as_bytes())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", base64url_encode(&sig))
}

fn jwt(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let mut group = c.benchmark_group("jwt_verify");
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let ec = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let ed = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let jwks = Jwks {
        keys: vec![
            Jwk {
                kid: None,
                alg: None,
                key: JwkKey::Ec {
                    curve: EcCurve::P256,
                    point: ec.public_key().as_ref().to_vec(),
                },
            },
            Jwk {
                kid: None,
                alg: None,
                key: JwkKey::Ed25519 {
                    x: ed.public_key().as_ref().to_vec(),
                },
            },
        ],
    };
    let p = provider(&jwks);
    let es256 = token("ES256", |m| ec.sign(&rng, m).unwrap().as_ref().to_vec());
    let eddsa = token("EdDSA", |m| ed.sign(m).as_ref().to_vec());
    for (name, t) in [("es256", &es256), ("eddsa", &eddsa)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let parsed = keel_tls::jwt::parse(black_box(t)).unwrap();
                black_box(keel_tls::jwt::verify(&parsed, &p, &jwks, 1_800_000_000).unwrap())
            })
        });
    }
    group.bench_function("parse_only", |b| {
        b.iter(|| black_box(keel_tls::jwt::parse(black_box(&es256)).unwrap()))
    });
    group.finish();
}

/// The bench's policy: ten DENY rules and ten ALLOW rules, the last ALLOW one matching.
fn twenty_rules() -> Authz {
    let mut deny = String::from("action: DENY\nrules:\n");
    let mut allow = String::from("action: ALLOW\nrules:\n");
    for i in 1..=10 {
        deny += &format!("- {{ from: [{{ source: {{ ipBlocks: [\"10.{i}.0.0/16\"] }} }}], to: [{{ operation: {{ paths: [\"/admin{i}/*\"] }} }}] }}\n");
    }
    for i in 1..=9 {
        allow += &format!("- {{ to: [{{ operation: {{ methods: [\"POST\"], paths: [\"/api/v{i}/*\"] }} }}], when: [{{ key: \"request.headers[x-tenant]\", values: [\"t{i}\"] }}] }}\n");
    }
    allow += "- { from: [{ source: { requestPrincipals: [\"https://issuer.bench/*\"] } }], to: [{ operation: { methods: [\"GET\"], paths: [\"/1k\"] } }], when: [{ key: \"request.auth.claims[groups]\", values: [\"load\"] }] }\n";
    let mut authz = Authz::default();
    for (name, yaml) in [("deny", deny), ("allow", allow)] {
        let spec = serde_saphyr::from_str(&yaml).unwrap();
        authz.push(compile_policy(name.into(), &spec).unwrap());
    }
    authz
}

fn authz(c: &mut Criterion) {
    let authz = twenty_rules();
    let conn = Connection {
        source_ip: "127.0.0.1".parse().unwrap(),
        remote_ip: "127.0.0.1".parse().unwrap(),
        destination_ip: "127.0.0.1".parse().unwrap(),
        destination_port: 18014,
        principal: None,
        namespace: None,
        sni: None,
    };
    let jwt = keel_config::authz::JwtIdentity {
        principal: "https://issuer.bench/wrk".into(),
        audiences: vec!["bench".into()],
        presenter: None,
        claims: serde_json::from_str(r#"{"groups":["load"]}"#).unwrap(),
    };
    c.bench_function("authz_20_rules_allow_last", |b| {
        b.iter(|| {
            let header = |_: &str| -> Option<&[u8]> { None };
            let path = keel_config::authz::normalize_path(black_box("/1k"));
            let req = HttpRequest {
                host: "bench",
                method: "GET",
                path: &path,
                header: &header,
                jwt: Some(&jwt),
            };
            let v = authz.evaluate(&conn, Some(&req));
            assert!(v.allowed);
            black_box(v.allowed)
        })
    });
}

criterion_group!(benches, jwt, authz);
criterion_main!(benches);
