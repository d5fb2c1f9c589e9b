//! CPU and byte quantities in the notation Kubernetes uses (`500m`, `0.5`,
//! `2Gi`, `1G`, `129e6`), which is what users of the platform already write
//! in `resources` and `storage`.
//!
//! Each quantity keeps the text as written (so it can be shown back
//! unchanged) next to its value in an integer unit the runtimes use.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A CPU amount: `2` (cores), `0.5` (half a core) or `500m` (millicores).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CpuQuantity {
    /// As written in the manifest.
    pub text: String,
    /// Thousandths of a core; fractions of a millicore round up, as
    /// Kubernetes does.
    pub millicores: u64,
}

/// An amount of bytes: `1000000`, `1G` (10^9), `2Gi` (2^31), `129e6`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ByteQuantity {
    /// As written in the manifest.
    pub text: String,
    /// Fractions of a byte round up.
    pub bytes: u64,
}

impl fmt::Display for CpuQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for ByteQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const CPU_FORM: &str = "use cores like 2 or 0.5, or millicores like 500m";
const BYTE_FORM: &str = "use bytes like 1000000, or a number with a unit: Ki, Mi, Gi, Ti, Pi, Ei (powers of 1024) or k, M, G, T, P, E (powers of 1000), e.g. 512Mi or 2Gi";

impl FromStr for CpuQuantity {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not a CPU quantity; {CPU_FORM}");
        let (number, per_core) = match text.strip_suffix('m') {
            Some(number) => (number, 1),
            None => (text, 1000),
        };
        let decimal = Decimal::parse(number).ok_or_else(bad)?;
        let millicores = decimal
            .times_ceil(per_core)
            .ok_or_else(|| format!("{text:?} is more CPU than any machine has; {CPU_FORM}"))?;
        if millicores == 0 {
            return Err(format!("{text:?} is no CPU at all; {CPU_FORM}"));
        }
        Ok(CpuQuantity {
            text: text.to_owned(),
            millicores,
        })
    }
}

impl FromStr for ByteQuantity {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const UNITS: [(&str, u128); 12] = [
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("Pi", 1 << 50),
            ("Ei", 1 << 60),
            ("k", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
            ("P", 1_000_000_000_000_000),
            ("E", 1_000_000_000_000_000_000),
        ];
        // Kubernetes reads a trailing `m` as milli; `512m` for memory is
        // nearly always meant as megabytes (Docker's notation), so it is
        // refused with a hint rather than taken as half a byte.
        if let Some(number) = text.strip_suffix('m')
            && Decimal::parse(number).is_some()
        {
            return Err(format!(
                "{text:?} is not a byte quantity: 'm' means thousandths; did you mean {number}Mi or {number}M? {BYTE_FORM}"
            ));
        }
        let bad = || format!("{text:?} is not a byte quantity; {BYTE_FORM}");
        let (number, unit) = UNITS
            .iter()
            .find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|n| (n, *unit)))
            .unwrap_or((text, 1));
        let decimal = Decimal::parse(number).ok_or_else(bad)?;
        let bytes = decimal
            .times_ceil(unit)
            .ok_or_else(|| format!("{text:?} is too large; {BYTE_FORM}"))?;
        if bytes == 0 {
            return Err(format!("{text:?} is zero bytes; {BYTE_FORM}"));
        }
        Ok(ByteQuantity {
            text: text.to_owned(),
            bytes,
        })
    }
}

/// A non-negative decimal `digits / 10^scale`, exact, as parsed from
/// `123`, `0.5`, `.5`, `1.5e3` or `129e6`.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    digits: u128,
    /// Negative when the exponent outweighs the fraction (`1e3`).
    scale: i32,
}

/// More significant digits than this cannot be a sensible quantity and would
/// overflow the exact arithmetic below.
const MAX_DIGITS: usize = 30;

impl Decimal {
    fn parse(text: &str) -> Option<Decimal> {
        let text = text.strip_prefix('+').unwrap_or(text);
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(i) => {
                let exp = &text[i + 1..];
                let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                if digits.is_empty()
                    || digits.len() > 3
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return None;
                }
                (&text[..i], exp.parse::<i32>().ok()?)
            }
            None => (text, 0),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let all_digits = whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit());
        if !all_digits || whole.len() + fraction.len() > MAX_DIGITS {
            return None;
        }
        let mut digits: u128 = 0;
        for b in whole.bytes().chain(fraction.bytes()) {
            digits = digits * 10 + u128::from(b - b'0');
        }
        // Both terms are bounded (<= 30 and <= 999), so this cannot overflow.
        let scale = fraction.len() as i32 - exponent;
        Some(Decimal { digits, scale })
    }

    /// `self * unit`, rounded up to a whole number, if it fits in a u64.
    fn times_ceil(&self, unit: u128) -> Option<u64> {
        let mut value = self.digits.checked_mul(unit)?;
        if self.scale < 0 {
            for _ in 0..self.scale.unsigned_abs() {
                value = value.checked_mul(10)?;
                if value > u128::from(u64::MAX) {
                    return None;
                }
            }
        } else if self.scale > 0 {
            // 10^scale may exceed u128 for tiny values; then the result is
            // at most 1 (rounded up) unless the value is zero.
            match 10u128.checked_pow(self.scale.unsigned_abs()) {
                Some(divisor) => value = value.div_ceil(divisor),
                None => value = u128::from(value > 0),
            }
        }
        u64::try_from(value).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(text: &str) -> Result<u64, String> {
        text.parse::<CpuQuantity>().map(|q| q.millicores)
    }

    fn bytes(text: &str) -> Result<u64, String> {
        text.parse::<ByteQuantity>().map(|q| q.bytes)
    }

    #[test]
    fn cpu_quantities_in_cores_and_millicores() {
        assert_eq!(cpu("500m"), Ok(500));
        assert_eq!(cpu("0.5"), Ok(500));
        assert_eq!(cpu(".25"), Ok(250));
        assert_eq!(cpu("2"), Ok(2000));
        assert_eq!(cpu("1.5m"), Ok(2), "fractions of a millicore round up");
        assert_eq!(cpu("0.0001"), Ok(1));
        assert_eq!(cpu("1e1"), Ok(10_000));
        assert_eq!(cpu("+1"), Ok(1000));
    }

    #[test]
    fn cpu_rejects_other_forms_saying_what_is_expected() {
        for bad in [
            "5 cores", "", "m", "-1", "1.2.3", "1k", "two", "0", "0m", "1e", ".",
        ] {
            let err = cpu(bad).unwrap_err();
            assert!(err.contains("500m"), "{bad}: {err}");
        }
        assert!(cpu("99999999999999999999999").is_err());
    }

    #[test]
    fn byte_quantities_binary_decimal_and_plain() {
        assert_eq!(bytes("1000000"), Ok(1_000_000));
        assert_eq!(bytes("2Gi"), Ok(2 << 30));
        assert_eq!(bytes("512Mi"), Ok(512 << 20));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("1k"), Ok(1000));
        assert_eq!(bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(bytes("129e6"), Ok(129_000_000));
        assert_eq!(bytes("1.5"), Ok(2), "fractions of a byte round up");
        assert_eq!(bytes("15Ei"), Ok(15 << 60));
    }

    #[test]
    fn byte_quantities_reject_nonsense_and_overflow() {
        for bad in [
            "lots", "", "Gi", "1 Gi", "1GB", "1g", "-5Mi", "0", "0Gi", "16Ei",
        ] {
            let err = bytes(bad).unwrap_err();
            assert!(err.contains("512Mi"), "{bad}: {err}");
        }
        assert!(bytes("1e999").is_err());
        assert!(bytes(&"9".repeat(40)).is_err());
    }

    #[test]
    fn memory_in_millis_gets_a_hint() {
        let err = bytes("512m").unwrap_err();
        assert!(err.contains("did you mean 512Mi"), "{err}");
    }

    #[test]
    fn quantities_keep_the_text_as_written() {
        let q: ByteQuantity = "2Gi".parse().unwrap();
        assert_eq!(q.to_string(), "2Gi");
    }
}
