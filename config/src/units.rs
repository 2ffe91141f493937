//! Human units used in the routing language: durations (`250ms`), rates (`100/s`) and
//! byte sizes (`64KiB`).
//!
//! Each unit parses from a string, refuses zero (a zero timeout or rate is always a mistake
//! in this language), serialises back to the same canonical form, and describes itself in
//! the JSON Schema with a pattern so editors flag typos before the control plane does.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a unit string was refused; the message is shown to operators as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

/// A strictly positive duration written with a unit: `500us`, `250ms`, `2s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(StdDuration);

/// A strictly positive rate: `100/s`, `6000/min`, `10000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    count: u64,
    per: StdDuration,
}

/// A strictly positive size in bytes: `65536`, `64KiB`, `1MiB`, `1GiB` (also `KB`/`MB`/`GB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

const DURATION_UNITS: &[(&str, u64)] = &[
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];
const RATE_UNITS: &[(&str, u64)] = &[("s", 1), ("sec", 1), ("m", 60), ("min", 60), ("h", 3600)];
const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
];

/// Splits `"250ms"` into `(250, "ms")`; the number must be a non-negative integer.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let (number, unit) = s.split_at(digits);
    Some((number.parse().ok()?, unit.trim()))
}

fn lookup(table: &[(&str, u64)], unit: &str) -> Option<u64> {
    table
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, f)| *f)
}

impl Duration {
    /// Builds a duration; zero is refused like it is in YAML.
    pub fn new(d: StdDuration) -> Result<Self, UnitError> {
        if d.is_zero() {
            return Err(UnitError("must be greater than 0".into()));
        }
        Ok(Self(d))
    }

    pub fn get(self) -> StdDuration {
        self.0
    }
}

impl FromStr for Duration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            UnitError(format!(
                "invalid duration `{s}`: expected a whole number and a unit (us, ms, s, m, h), e.g. `250ms` or `2s`"
            ))
        };
        let (n, unit) = split_number(s.trim()).ok_or_else(bad)?;
        let nanos = lookup(DURATION_UNITS, unit)
            .and_then(|f| n.checked_mul(f))
            .ok_or_else(bad)?;
        Self::new(StdDuration::from_nanos(nanos))
            .map_err(|_| UnitError(format!("invalid duration `{s}`: must be greater than 0")))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        // Largest unit that divides evenly, so `1500ms` stays `1500ms` and `2000ms` is `2s`.
        for (unit, factor) in DURATION_UNITS.iter().rev() {
            if nanos % u128::from(*factor) == 0 {
                return write!(f, "{}{unit}", nanos / u128::from(*factor));
            }
        }
        write!(f, "{}us", nanos / 1_000)
    }
}

impl Rate {
    /// `count` events per `per`; both must be non-zero.
    pub fn new(count: u64, per: StdDuration) -> Result<Self, UnitError> {
        if count == 0 || per.is_zero() {
            return Err(UnitError("must be greater than 0".into()));
        }
        Ok(Self { count, per })
    }

    pub fn count(self) -> u64 {
        self.count
    }

    pub fn per(self) -> StdDuration {
        self.per
    }

    /// The rate in events per second (may be fractional, e.g. `30/min` is 0.5).
    pub fn per_second(self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }
}

impl FromStr for Rate {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            UnitError(format!(
                "invalid rate `{s}`: expected `<count>/<unit>` with unit s, min or h, e.g. `100/s` or `6000/min`"
            ))
        };
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        let secs = lookup(RATE_UNITS, unit.trim()).ok_or_else(bad)?;
        Self::new(count, StdDuration::from_secs(secs))
            .map_err(|_| UnitError(format!("invalid rate `{s}`: must be greater than 0")))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            _ => return write!(f, "{}/{}s", self.count, self.per.as_secs_f64()),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl ByteSize {
    pub fn new(bytes: u64) -> Result<Self, UnitError> {
        if bytes == 0 {
            return Err(UnitError("must be greater than 0".into()));
        }
        Ok(Self(bytes))
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            UnitError(format!(
                "invalid size `{s}`: expected a whole number with an optional unit (B, KiB, MiB, GiB, KB, MB, GB), e.g. `64KiB`"
            ))
        };
        let (n, unit) = split_number(s.trim()).ok_or_else(bad)?;
        let bytes = lookup(SIZE_UNITS, unit)
            .and_then(|f| n.checked_mul(f))
            .ok_or_else(bad)?;
        Self::new(bytes)
            .map_err(|_| UnitError(format!("invalid size `{s}`: must be greater than 0")))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 % factor == 0 {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Implements serde and schemars for a unit type that round-trips through its string form.
macro_rules! string_unit {
    ($ty:ty, $name:literal, $pattern:literal, $description:literal, $example:literal, accepts_integers: $ints:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(concat!("a ", $name, " such as `", $example, "`"))
                    }

                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }

                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        if $ints {
                            self.visit_str(&v.to_string())
                        } else {
                            Err(E::custom(format!(
                                concat!("invalid ", $name, " `{}`: a unit is required, e.g. `", $example, "`"),
                                v
                            )))
                        }
                    }

                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        Err(E::custom(format!(concat!("invalid ", $name, " `{}`: must be greater than 0"), v)))
                    }

                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$ty, E> {
                        Err(E::custom(format!(
                            concat!("invalid ", $name, " `{}`: use a whole number and a unit, e.g. `", $example, "`"),
                            v
                        )))
                    }
                }
                deserializer.deserialize_any(V)
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($ty))
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": if $ints { serde_json::json!(["string", "integer"]) } else { serde_json::json!("string") },
                    "pattern": $pattern,
                    "description": $description,
                    "examples": [$example],
                })
            }
        }
    };
}

string_unit!(
    Duration,
    "duration",
    "^[0-9]+(us|ms|s|m|h)$",
    "A duration greater than zero: a whole number and a unit (us, ms, s, m, h), e.g. `250ms`, `2s`.",
    "250ms",
    accepts_integers: false
);
string_unit!(
    Rate,
    "rate",
    "^[0-9]+/(s|sec|m|min|h)$",
    "A rate greater than zero: `<count>/<unit>` with unit s, min or h, e.g. `100/s`, `6000/min`.",
    "100/s",
    accepts_integers: false
);
string_unit!(
    ByteSize,
    "size",
    "^[0-9]+(B|KiB|MiB|GiB|KB|MB|GB)?$",
    "A size in bytes greater than zero, with an optional unit: `65536`, `64KiB`, `1MiB`.",
    "64KiB",
    accepts_integers: true
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_canonically() {
        let cases = [
            ("250ms", 250_000_000u64, "250ms"),
            ("2s", 2_000_000_000, "2s"),
            ("2000ms", 2_000_000_000, "2s"),
            ("1500ms", 1_500_000_000, "1500ms"),
            ("5m", 300_000_000_000, "5m"),
            ("1h", 3_600_000_000_000, "1h"),
            ("750us", 750_000, "750us"),
        ];
        for (input, nanos, canonical) in cases {
            let d: Duration = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(d.get(), StdDuration::from_nanos(nanos), "{input}");
            assert_eq!(d.to_string(), canonical);
        }
    }

    #[test]
    fn bad_durations_say_why() {
        for bad in ["", "ms", "2", "2 seconds", "-1s", "1.5s", "2d"] {
            let err = bad.parse::<Duration>().expect_err(bad).to_string();
            assert!(
                err.contains("expected a whole number and a unit"),
                "{bad}: {err}"
            );
        }
        let zero = "0s".parse::<Duration>().expect_err("zero");
        assert_eq!(
            zero.to_string(),
            "invalid duration `0s`: must be greater than 0"
        );
    }

    #[test]
    fn rates_parse() {
        let r: Rate = "6000/min".parse().expect("valid");
        assert_eq!(r.count(), 6000);
        assert_eq!(r.per(), StdDuration::from_secs(60));
        assert!((r.per_second() - 100.0).abs() < f64::EPSILON);
        assert_eq!(r.to_string(), "6000/min");
        assert_eq!("100/s".parse::<Rate>().expect("valid").to_string(), "100/s");
        assert!("0/s".parse::<Rate>().is_err());
        assert!("100".parse::<Rate>().is_err());
        assert!("100/day".parse::<Rate>().is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("64KiB".parse::<ByteSize>().expect("valid").bytes(), 65_536);
        assert_eq!(
            "65536".parse::<ByteSize>().expect("valid").to_string(),
            "64KiB"
        );
        assert_eq!("1MB".parse::<ByteSize>().expect("valid").bytes(), 1_000_000);
        assert!("0".parse::<ByteSize>().is_err());
        assert!("12 parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn yaml_integers_need_a_unit_for_durations_but_not_sizes() {
        let err = serde_norway::from_str::<Duration>("2").expect_err("no unit");
        assert!(err.to_string().contains("a unit is required"), "{err}");
        let size: ByteSize = serde_norway::from_str("1024").expect("bytes");
        assert_eq!(size.bytes(), 1024);
    }
}
