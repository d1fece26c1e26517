//! Traffic policy in config: VirtualService timeout, retries, fault and mirrors, and
//! DestinationRule connectionPool circuit breakers, compiled or refused with their field path.

use keel_config::http_routes::{Abort, RetryOn, RouteAction, Share};
use keel_config::{load_str, ConfigError, Snapshot};

const BASE: &str = "apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: { name: productpage, namespace: default }
spec:
  workload: { labels: { app: productpage } }
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
  hosts: [reviews, ratings]
  ports: [{ number: 9080, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints:
  - { address: 127.0.0.1, ports: { http: 19080 } }
";

fn with(extra: &str) -> String {
    format!("{BASE}---\n{extra}")
}

fn load(yaml: &str) -> Snapshot {
    load_str("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn one_error(yaml: &str) -> ConfigError {
    match load_str("test.yaml", yaml) {
        Ok(_) => panic!("config was accepted:\n{yaml}"),
        Err(e) => {
            assert_eq!(e.0.len(), 1, "expected one error, got {:#?}", e.0);
            e.0.into_iter().next().unwrap()
        }
    }
}

/// The routes of the `reviews` virtual host on the egress listener.
fn reviews_routes(s: &Snapshot) -> &[keel_config::http_routes::HttpRoute] {
    let table = s.listeners[0].http.as_ref().unwrap();
    let vhost = table.virtual_host("reviews").unwrap();
    &vhost.routes
}

#[test]
fn route_without_policy_gets_istio_default_retries() {
    let s = load(BASE);
    let p = &reviews_routes(&s)[0].policy;
    assert_eq!(p.timeout, None);
    let r = p.retry.as_ref().unwrap();
    assert_eq!(r.retries, 2);
    assert!(r.on.has(RetryOn::CONNECT_FAILURE) && !r.on.has(RetryOn::FIVE_XX));
    assert!(r.retries_response(503, None) && !r.retries_response(500, None));
    assert!(r.retries_response(200, Some(14)), "gRPC unavailable");
}

#[test]
fn timeout_retries_fault_and_mirrors_compile() {
    let s = load(&with(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews }
spec:
  hosts: [reviews]
  http:
  - timeout: 2s
    retries: { attempts: 3, perTryTimeout: 500ms, retryOn: \"gateway-error,connect-failure,409\" }
    fault:
      delay: { fixedDelay: 5s, percentage: { value: 12.5 } }
      abort: { grpcStatus: UNAVAILABLE, percentage: { value: 100 } }
    mirror: { host: ratings }
    mirrorPercentage: { value: 50 }
    route: [{ destination: { host: reviews } }]
",
    ));
    let route = &reviews_routes(&s)[0];
    let p = &route.policy;
    assert_eq!(p.timeout.unwrap().as_millis(), 2000);
    let r = p.retry.as_ref().unwrap();
    assert_eq!(r.retries, 3);
    assert_eq!(r.per_try_timeout.unwrap().as_millis(), 500);
    assert_eq!(r.statuses, vec![409]);
    assert!(r.retries_response(502, None) && r.retries_response(409, None));
    assert!(
        !r.retries_response(500, None),
        "gateway-error is 502-504 only"
    );
    assert!(
        !r.retries_response(200, Some(14)),
        "explicit retryOn replaces the default"
    );
    let f = p.fault.as_ref().unwrap();
    assert_eq!(f.delay.unwrap().0.as_secs(), 5);
    assert_eq!(f.delay.unwrap().1, Share(125_000));
    assert_eq!(f.abort.unwrap(), (Abort::Grpc(14), Share::ALL));
    assert_eq!(p.mirrors.len(), 1);
    assert_eq!(p.mirrors[0].share, Share(500_000));
    assert!(s.clusters[p.mirrors[0].cluster].name.contains("ratings"));
    assert!(matches!(route.action, RouteAction::Forward { .. }));
}

#[test]
fn zero_attempts_disable_retries_and_fault_without_percentage_hits_nobody() {
    let s = load(&with(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews }
spec:
  hosts: [reviews]
  http:
  - retries: { attempts: 0 }
    fault: { abort: { httpStatus: 400 } }
    route: [{ destination: { host: reviews } }]
",
    ));
    let p = &reviews_routes(&s)[0].policy;
    assert!(p.retry.is_none());
    assert_eq!(
        p.fault.as_ref().unwrap().abort,
        Some((Abort::Http(400), Share(0)))
    );
}

#[test]
fn circuit_breakers_from_connection_pool() {
    let s = load(&with(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: { maxConnections: 1 }
      http: { http1MaxPendingRequests: 1, maxRequestsPerConnection: 1, http2MaxRequests: 7, maxRetries: 2, idleTimeout: 30s }
",
    ));
    let c = s
        .clusters
        .iter()
        .find(|c| c.name.contains("reviews"))
        .unwrap();
    assert_eq!(c.limits.max_connections, 1);
    assert_eq!(c.limits.max_pending_requests, 1);
    assert_eq!(c.limits.max_requests_per_connection, 1);
    assert_eq!(c.limits.max_requests, 7);
    assert_eq!(c.limits.max_retries, Some(2));
    assert_eq!(c.pool_idle_timeout.as_secs(), 30);
    let other = s.clusters.iter().find(|c| c.name.contains("ratings"));
    if let Some(o) = other {
        assert_eq!(o.limits.max_connections, u32::MAX);
    }
}

#[test]
fn bad_policies_name_their_field() {
    let vs = |route: &str| {
        with(&format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: reviews }}
spec:
  hosts: [reviews]
  http:
  - {route}
    route: [{{ destination: {{ host: reviews }} }}]
"
        ))
    };
    let e = one_error(&vs(
        "retries: { attempts: 2, retryOn: \"5xx,gateway-eror\" }",
    ));
    assert_eq!(e.path, "spec.http[0].retries.retryOn");
    assert!(e.message.contains("did you mean `gateway-error`"), "{e}");
    let e = one_error(&vs(
        "fault: { abort: { httpStatus: 700, percentage: { value: 5 } } }",
    ));
    assert_eq!(e.path, "spec.http[0].fault.abort.httpStatus");
    let e = one_error(&vs(
        "fault: { abort: { grpcStatus: UNAVAILABLE, httpStatus: 503 } }",
    ));
    assert_eq!(e.path, "spec.http[0].fault.abort");
    let e = one_error(&vs(
        "fault: { delay: { fixedDelay: 1s, percentage: { value: 120 } } }",
    ));
    assert_eq!(e.path, "spec.http[0].fault.delay.percentage");
    let e = one_error(&vs("fault: { abort: { grpcStatus: UNAVAILBLE } }"));
    assert!(e.message.contains("did you mean `UNAVAILABLE`"), "{e}");
    let e = one_error(&vs("mirrorPercentage: { value: 10 }"));
    assert_eq!(e.path, "spec.http[0].mirrorPercentage");
    let e = one_error(&vs("mirror: { host: nowhere }"));
    assert_eq!(e.path, "spec.http[0].mirror");
    let e = one_error(&with(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews }
spec:
  hosts: [reviews]
  http:
  - fault: { abort: { httpStatus: 503, percentage: { value: 1 } } }
    directResponse: { status: 200 }
",
    ));
    assert_eq!(e.path, "spec.http[0].fault");
    let e = one_error(&vs("retries: { attempts: 2, retryRemoteLocalities: true }"));
    assert!(e.message.contains("not supported yet"), "{e}");
    let dr = |pool: &str| {
        with(&format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews }}
spec:
  host: reviews
  trafficPolicy: {{ connectionPool: {pool} }}
"
        ))
    };
    let e = one_error(&dr("{ tcp: { maxConnections: -1 } }"));
    assert_eq!(
        e.path,
        "spec.trafficPolicy.connectionPool.tcp.maxConnections"
    );
    let e = one_error(&dr("{ http: { h2UpgradePolicy: SOMETIMES } }"));
    assert_eq!(
        e.path,
        "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy"
    );
    let e = one_error(&dr("{ http: { maxConcurrentStreams: -10 } }"));
    assert_eq!(
        e.path,
        "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams"
    );
}

/// The upstream protocol, decided as Istio decides it: the port's declared protocol, else the
/// DestinationRule's h2UpgradePolicy / useClientProtocol.
#[test]
fn upstream_protocol_follows_the_port_and_the_destination_rule() {
    use keel_config::UpstreamProtocol;
    let protocol_of = |yaml: &str| {
        let s = load(yaml);
        let c = s
            .clusters
            .iter()
            .find(|c| {
                c.name.ends_with("|reviews.default.svc.cluster.local")
                    || c.name.ends_with("|reviews")
            })
            .unwrap_or_else(|| {
                panic!(
                    "{:?}",
                    s.clusters.iter().map(|c| &c.name).collect::<Vec<_>>()
                )
            });
        (c.protocol, c.limits.max_concurrent_streams)
    };
    assert_eq!(protocol_of(BASE), (UpstreamProtocol::Http1, u32::MAX));
    let dr = |http: &str| {
        with(&format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews }}
spec:
  host: reviews
  trafficPolicy: {{ connectionPool: {{ http: {http} }} }}
"
        ))
    };
    assert_eq!(
        protocol_of(&dr(
            "{ h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 50 }"
        )),
        (UpstreamProtocol::Http2, 50)
    );
    assert_eq!(
        protocol_of(&dr("{ h2UpgradePolicy: DO_NOT_UPGRADE }")).0,
        UpstreamProtocol::Http1
    );
    assert_eq!(
        protocol_of(&dr("{ useClientProtocol: true }")).0,
        UpstreamProtocol::Client
    );
    for declared in ["HTTP2", "GRPC", "grpc-web"] {
        let yaml = BASE.replace(
            "ports: [{ number: 9080, name: http, protocol: HTTP }]",
            &format!("ports: [{{ number: 9080, name: http, protocol: {declared} }}]"),
        );
        assert_eq!(protocol_of(&yaml).0, UpstreamProtocol::Http2, "{declared}");
    }
    // A Sidecar port declared GRPC is an HTTP listener (HTTP/1.1 and HTTP/2 on one port).
    let yaml = BASE.replace(
        "- port: { number: 9080, protocol: HTTP }",
        "- port: { number: 9080, protocol: GRPC }",
    );
    assert!(load(&yaml).listeners[0].http.is_some());
}

/// The YAML of Istio's circuit-breaking, fault-injection, timeout, retry and mirroring tasks (as
/// docs/resilience.md shows it) loads as written.
#[test]
fn istio_task_yaml_loads_as_written() {
    let services = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: httpbin }
spec:
  hosts: [httpbin]
  ports: [{ number: 9080, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints:
  - { address: 127.0.0.1, ports: { http: 18000 }, labels: { version: v1 } }
  - { address: 127.0.0.2, ports: { http: 18000 }, labels: { version: v2 } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  subsets: [{ name: v1, labels: {} }, { name: v2, labels: {} }]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: ratings }
spec:
  host: ratings
  subsets: [{ name: v1, labels: {} }]
";
    let circuit_breaker = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
";
    let s = load(&format!("{BASE}{services}{circuit_breaker}"));
    let c = s
        .clusters
        .iter()
        .find(|c| c.name.contains("httpbin"))
        .unwrap();
    assert_eq!(c.limits.max_connections, 1);
    let od = c.outlier.unwrap();
    assert_eq!((od.consecutive_5xx, od.max_ejection_percent), (1, 100));
    assert_eq!(od.base_ejection.as_secs(), 180);

    let fault = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
    timeout: 0.5s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream
";
    let s = load(&format!("{BASE}{services}{fault}"));
    let table = s.listeners[0].http.as_ref().unwrap();
    let ratings = &table.virtual_host("ratings").unwrap().routes;
    assert_eq!(
        ratings[0].policy.fault.as_ref().unwrap().delay.unwrap().1,
        Share::ALL
    );
    let reviews = &table.virtual_host("reviews").unwrap().routes[0].policy;
    assert_eq!(reviews.timeout.unwrap().as_millis(), 500);
    assert_eq!(reviews.retry.as_ref().unwrap().retries, 3);

    let mirror = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: httpbin }
spec:
  host: httpbin
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - httpbin
  http:
  - route:
    - destination:
        host: httpbin
        subset: v1
      weight: 100
    mirror:
      host: httpbin
      subset: v2
    mirrorPercentage:
      value: 100.0
";
    let s = load(&format!("{BASE}{services}{mirror}"));
    let table = s.listeners[0].http.as_ref().unwrap();
    let p = &table.virtual_host("httpbin").unwrap().routes[0].policy;
    assert_eq!(p.mirrors.len(), 1);
    assert!(s.clusters[p.mirrors[0].cluster].name.contains("|v2|"));
}

/// Active health checks come from the ServiceEntry's `health.keel.dev/*` annotations; a bad one is
/// refused naming the annotation.
#[test]
fn health_check_annotations() {
    let annotated = |annotations: &str| {
        BASE.replace(
            "metadata: { name: services }",
            &format!("metadata:\n  name: services\n  annotations:\n{annotations}"),
        )
    };
    let s = load(&annotated(
        "    health.keel.dev/path: /healthz\n    health.keel.dev/expected-statuses: \"200-204,301\"\n    health.keel.dev/interval: 2s\n",
    ));
    let c = s
        .clusters
        .iter()
        .find(|c| c.name.contains("reviews"))
        .unwrap();
    let hc = c.health_check.as_ref().unwrap();
    assert_eq!(hc.http_path.as_deref(), Some("/healthz"));
    assert_eq!(hc.statuses, vec![(200, 204), (301, 301)]);
    assert_eq!(hc.interval.as_secs(), 2);
    assert_eq!((hc.unhealthy_threshold, hc.healthy_threshold), (3, 2));
    assert_eq!(hc.host, "reviews.default.svc.cluster.local");
    let tcp = load(&annotated("    health.keel.dev/protocol: tcp\n"));
    let c = tcp
        .clusters
        .iter()
        .find(|c| c.name.contains("reviews"))
        .unwrap();
    assert!(c.health_check.as_ref().unwrap().http_path.is_none());
    let e = one_error(&annotated("    health.keel.dev/intervl: 2s\n"));
    assert!(
        e.message
            .contains("did you mean `health.keel.dev/interval`"),
        "{e}"
    );
    let e = one_error(&annotated("    health.keel.dev/path: healthz\n"));
    assert!(e.path.ends_with("health.keel.dev/path"), "{e}");
    let e = one_error(&annotated(
        "    health.keel.dev/interval: 1s\n    health.keel.dev/timeout: 2s\n",
    ));
    assert!(e.message.contains("longer than the interval"), "{e}");
}

#[test]
fn peak_ewma_annotation() {
    let dr = |annotation: &str, policy: &str| {
        with(&format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  annotations: {{ keel.dev/load-balancer: {annotation} }}
spec:
  host: reviews
{policy}"
        ))
    };
    let s = load(&dr("PEAK_EWMA", ""));
    let c = s
        .clusters
        .iter()
        .find(|c| c.name.contains("reviews"))
        .unwrap();
    assert_eq!(c.lb, keel_config::LbPolicy::PeakEwma);
    let e = one_error(&dr("PEAK", ""));
    assert!(e.message.contains("not a Keel balancer"), "{e}");
    let e = one_error(&dr(
        "PEAK_EWMA",
        "  trafficPolicy: { loadBalancer: { consistentHash: { useSourceIp: true } } }\n",
    ));
    assert!(e.message.contains("consistentHash"), "{e}");
}
