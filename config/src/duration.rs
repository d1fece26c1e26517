//! Istio durations (`100ms`, `1.5s`, `3m`, `1h30m`) as they appear in VirtualService and DestinationRule.

use std::fmt;
use std::time::Duration as StdDuration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written the way Istio users write them, kept with its original spelling for dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub StdDuration);

/// Parses a Go-style duration: one or more `<number><unit>` with units ns, us, µs, ms, s, m, h.
pub fn parse(s: &str) -> Result<StdDuration, String> {
    let err = || {
        format!(
            "invalid duration {s:?}: expected a positive duration such as 100ms, 1.5s, 3m or 1h"
        )
    };
    let mut rest = s.trim();
    if rest.is_empty() || rest.starts_with('-') {
        return Err(err());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let value: f64 = rest[..num_end].parse().map_err(|_| err())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 1e9 {
        return Err(err());
    }
    Ok(StdDuration::from_secs_f64(total))
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Duration).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !self.0.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}us", self.0.as_micros())
        } else if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", self.0.as_secs())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_examples() {
        assert_eq!(parse("100ms").unwrap(), StdDuration::from_millis(100));
        assert_eq!(parse("1.5s").unwrap(), StdDuration::from_millis(1500));
        assert_eq!(parse("3m").unwrap(), StdDuration::from_secs(180));
        assert_eq!(parse("1h").unwrap(), StdDuration::from_secs(3600));
        assert_eq!(parse("1h30m").unwrap(), StdDuration::from_secs(5400));
        assert_eq!(parse("250us").unwrap(), StdDuration::from_micros(250));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "10", "s", "-1s", "1x", "1.2.3s", "ms10"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["100ms", "2s", "250us"] {
            assert_eq!(Duration(parse(s).unwrap()).to_string(), s);
        }
    }
}
