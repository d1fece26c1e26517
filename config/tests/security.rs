//! Security resources in config: which AuthorizationPolicy and RequestAuthentication apply to the
//! workload (Istio's scoping), and the YAML of docs/security.md loading as written.

use keel_config::load_str;

const BASE: &str = "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: { name: reviews-v1, namespace: default }
spec:
  workload: { labels: { app: reviews, version: v1 } }
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default }
spec:
  egress:
  - port: { number: 9080, protocol: HTTP }
    hosts: [\"./*\"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: services }
spec:
  hosts: [reviews]
  ports: [{ number: 9080, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints:
  - { address: 127.0.0.1, ports: { http: 19080 } }
";

fn policy(name: &str, namespace: &str, selector: &str, action: &str) -> String {
    format!(
        "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{ name: {name}, namespace: {namespace} }}
spec:
{selector}  action: {action}
  rules: [{{}}]
"
    )
}

#[test]
fn policies_apply_by_namespace_and_selector_as_in_istio() {
    let yaml = format!(
        "{BASE}{}{}{}{}{}",
        // Namespace-wide, here.
        policy("ns-wide", "default", "", "AUDIT"),
        // Mesh-wide, from the root namespace.
        policy("mesh-wide", "istio-system", "", "DENY"),
        // Another namespace: not this workload's.
        policy("elsewhere", "prod", "", "DENY"),
        // Selecting this workload, and selecting another.
        policy(
            "mine",
            "default",
            "  selector: { matchLabels: { app: reviews } }\n",
            "ALLOW"
        ),
        policy(
            "theirs",
            "default",
            "  selector: { matchLabels: { app: ratings } }\n",
            "ALLOW"
        ),
    );
    let s = load_str("test.yaml", &yaml).unwrap_or_else(|e| panic!("{e}"));
    let mut names: Vec<&str> = s
        .security
        .authz
        .policies()
        .map(|p| p.name.as_str())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["default.mine", "default.ns-wide", "istio-system.mesh-wide"]
    );
}

#[test]
fn duplicate_issuers_and_bad_annotations_are_refused() {
    let ra = |name: &str, annotations: &str| {
        format!(
            "---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: {name}
  annotations: {{ {annotations} }}
spec:
  jwtRules:
  - issuer: https://a.example
    jwksUri: https://a.example/jwks
"
        )
    };
    let e = load_str(
        "test.yaml",
        &format!("{BASE}{}{}", ra("one", ""), ra("two", "")),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("issuer `https://a.example` has rules in more than one"),
        "{e}"
    );
    let e = load_str(
        "test.yaml",
        &format!("{BASE}{}", ra("one", "jwt.keel.dev/clock-skw: 5s")),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("did you mean `jwt.keel.dev/clock-skew`"),
        "{e}"
    );
}

#[test]
fn rate_limit_annotation_errors_name_the_entry() {
    let vs = |value: &str| {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  annotations:
    ratelimit.keel.dev/local: '{value}'
spec:
  hosts: [reviews]
  http:
  - name: api
    route: [{{ destination: {{ host: reviews }} }}]
"
        )
    };
    let ok = load_str(
        "test.yaml",
        &format!("{BASE}{}", vs("[{maxTokens: 3, fillInterval: 1s}]")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok.rate_limits.len(), 1);
    assert_eq!(ok.rate_limits[0].tokens_per_fill, 3);
    for (value, needle) in [
        ("[{maxTokens: 3, fillInterval: 10ms}]", "below the 50ms"),
        ("[{maxTokens: 0, fillInterval: 1s}]", "at least 1"),
        (
            "[{routes: [nope], maxTokens: 1, fillInterval: 1s}]",
            "no http route is named `nope`",
        ),
        (
            "[{maxTokens: 1, fillInterval: 1s, burst: 2}]",
            "not a list of",
        ),
    ] {
        let e = load_str("test.yaml", &format!("{BASE}{}", vs(value))).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("metadata.annotations.ratelimit.keel.dev/local"),
            "{text}"
        );
        assert!(text.contains(needle), "{value}: {text}");
    }
}

/// Every resource docs/security.md shows (but its Sidecar, which would be a second one) loads.
#[test]
fn security_doc_yaml_loads_as_written() {
    let doc = include_str!("../../docs/security.md");
    let mut blocks = 0;
    for block in doc.split("```yaml\n").skip(1) {
        let yaml = block.split("```").next().unwrap();
        if yaml.contains("kind: Sidecar") {
            continue;
        }
        let text = format!("{BASE}---\n{yaml}");
        load_str("test.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        blocks += 1;
    }
    assert!(blocks >= 5, "{blocks}");
}
