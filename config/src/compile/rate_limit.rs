//! Local rate limits, from a VirtualService's `ratelimit.keel.dev/local` annotation (Istio has no
//! field for them; Envoy's `local_ratelimit` token bucket, in its own terms):
//!
//! ```yaml
//! metadata:
//!   annotations:
//!     ratelimit.keel.dev/local: |
//!       - routes: [api]        # route names; left out: every route of this VirtualService
//!         maxTokens: 100       # the bucket's size (a burst)
//!         tokensPerFill: 10    # added every fillInterval (default maxTokens)
//!         fillInterval: 1s     # at least 50ms
//!         perClient: false     # true: one bucket per client address
//! ```

use std::time::Duration;

use serde::Deserialize;

use super::Compiler;
use crate::load::Located;
use crate::model::VirtualServiceSpec;

/// The annotation's key.
pub(super) const ANNOTATION: &str = "ratelimit.keel.dev/local";

/// One entry of the annotation, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    #[serde(default)]
    routes: Vec<String>,
    max_tokens: u32,
    #[serde(default)]
    tokens_per_fill: Option<u32>,
    fill_interval: crate::duration::Duration,
    #[serde(default)]
    per_client: bool,
}

/// One entry, checked.
#[derive(Debug, Clone)]
pub(super) struct RateLimitRule {
    pub routes: Vec<String>,
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    pub per_client: bool,
}

impl Compiler {
    /// The VirtualService's rate limits, first match per route; errors point at the annotation.
    pub(super) fn rate_limit_annotation(
        &mut self,
        vs: &Located<VirtualServiceSpec>,
    ) -> Vec<RateLimitRule> {
        let Some(text) = vs.value.metadata.annotations.get(ANNOTATION) else {
            return Vec::new();
        };
        let field = format!("metadata.annotations.{ANNOTATION}");
        let entries: Vec<Entry> = match serde_saphyr::from_str(text) {
            Ok(e) => e,
            Err(e) => {
                let msg = e.to_string();
                let msg = msg.lines().next().unwrap_or("").to_string();
                self.push_unique(vs.origin.error(
                    &field,
                    format!("not a list of {{routes, maxTokens, tokensPerFill, fillInterval, perClient}}: {msg}"),
                ));
                return Vec::new();
            }
        };
        let names: Vec<&str> = vs
            .value
            .spec
            .http
            .iter()
            .filter_map(|r| r.name.as_deref())
            .collect();
        let mut out = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            let mut bad = |m: String| {
                self.push_unique(vs.origin.error(&field, format!("entry {i}: {m}")));
            };
            let per_fill = e.tokens_per_fill.unwrap_or(e.max_tokens);
            if e.max_tokens == 0 || per_fill == 0 {
                bad("maxTokens and tokensPerFill must be at least 1".into());
                continue;
            }
            if e.fill_interval.0 < Duration::from_millis(50) {
                bad(format!(
                    "fillInterval {} is below the 50ms Envoy allows",
                    e.fill_interval
                ));
                continue;
            }
            if let Some(r) = e.routes.iter().find(|r| !names.contains(&r.as_str())) {
                bad(format!("no http route is named `{r}`"));
                continue;
            }
            out.push(RateLimitRule {
                routes: e.routes,
                max_tokens: e.max_tokens,
                tokens_per_fill: per_fill,
                fill_interval: e.fill_interval.0,
                per_client: e.per_client,
            });
        }
        out
    }
}
