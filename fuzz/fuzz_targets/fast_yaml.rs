//! Differential: the fast YAML reader either gives up or reads a document exactly as serde-saphyr
//! does, for every resource kind. A document it accepts and serde-saphyr refuses, or reads to a
//! different value, is a bug (the config would mean something else on the fast path).
#![no_main]

use keel_config::fast_yaml;
use keel_config::model::*;
use libfuzzer_sys::fuzz_target;
use serde::de::{DeserializeOwned, IgnoredAny};

fn agree<T: DeserializeOwned + std::fmt::Debug>(text: &str) {
    let Ok(fast) = fast_yaml::from_str::<Resource<T>>(text) else {
        return;
    };
    if let Err(e) = fast_yaml::check_against_serde_saphyr(text, &fast) {
        panic!("{e}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The tree alone: never a panic or a hang, whatever the input.
    let _ = fast_yaml::from_str::<IgnoredAny>(text);
    agree::<ProxySpec>(text);
    agree::<SidecarSpec>(text);
    agree::<ServiceEntrySpec>(text);
    agree::<VirtualServiceSpec>(text);
    agree::<DestinationRuleSpec>(text);
    agree::<GatewaySpec>(text);
    agree::<PeerAuthenticationSpec>(text);
    agree::<AuthorizationPolicySpec>(text);
    agree::<RequestAuthenticationSpec>(text);
});
