//! Falco's alert priorities: parsing, display and ordering.
//!
//! Falco numbers priorities from `Emergency` (0, most severe) to `Debug` (7).
//! [`Priority`] orders them by severity, so `Priority::Critical > Priority::Warning`.

use std::fmt;
use std::str::FromStr;

/// The severity of a Falco alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    Emergency,
    Alert,
    Critical,
    Error,
    Warning,
    Notice,
    Informational,
    Debug,
}

/// A priority name or number that Falco does not define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriorityError {
    #[error("unknown Falco priority {0:?} (expected one of Emergency, Alert, Critical, Error, Warning, Notice, Informational, Debug)")]
    UnknownName(String),
    #[error("unknown Falco priority number {0} (expected 0 = Emergency .. 7 = Debug)")]
    UnknownNumber(i32),
}

impl Priority {
    /// All priorities, most severe first.
    pub const ALL: [Priority; 8] = [
        Priority::Emergency,
        Priority::Alert,
        Priority::Critical,
        Priority::Error,
        Priority::Warning,
        Priority::Notice,
        Priority::Informational,
        Priority::Debug,
    ];

    /// The name Falco writes in its JSON output (`"Critical"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Emergency => "Emergency",
            Priority::Alert => "Alert",
            Priority::Critical => "Critical",
            Priority::Error => "Error",
            Priority::Warning => "Warning",
            Priority::Notice => "Notice",
            Priority::Informational => "Informational",
            Priority::Debug => "Debug",
        }
    }

    /// The lower-case name used in subjects (`"critical"`).
    pub fn as_lower_str(self) -> &'static str {
        match self {
            Priority::Emergency => "emergency",
            Priority::Alert => "alert",
            Priority::Critical => "critical",
            Priority::Error => "error",
            Priority::Warning => "warning",
            Priority::Notice => "notice",
            Priority::Informational => "informational",
            Priority::Debug => "debug",
        }
    }

    /// Falco's wire number: 0 for `Emergency` up to 7 for `Debug`.
    pub fn number(self) -> i32 {
        self as i32
    }

    /// The priority for Falco's wire number.
    pub fn from_number(n: i32) -> Result<Self, PriorityError> {
        usize::try_from(n)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .ok_or(PriorityError::UnknownNumber(n))
    }

    /// Severity rank: higher is more severe.
    fn severity(self) -> u8 {
        7 - self as u8
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.severity().cmp(&other.severity())
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = PriorityError;

    /// Case-insensitive; also accepts the short forms Falco's configuration
    /// accepts (`info`, `warn`, `err`, `emerg`, `crit`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Compared without a lower-cased copy: this runs once per alert.
        const NAMES: [(&str, Priority); 13] = [
            ("emergency", Priority::Emergency),
            ("alert", Priority::Alert),
            ("critical", Priority::Critical),
            ("error", Priority::Error),
            ("warning", Priority::Warning),
            ("notice", Priority::Notice),
            ("informational", Priority::Informational),
            ("debug", Priority::Debug),
            ("emerg", Priority::Emergency),
            ("crit", Priority::Critical),
            ("err", Priority::Error),
            ("warn", Priority::Warning),
            ("info", Priority::Informational),
        ];
        let name = s.trim();
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, p)| *p)
            .ok_or_else(|| PriorityError::UnknownName(s.to_owned()))
    }
}

/// Written as Falco writes it (`Critical`).
impl serde::Serialize for Priority {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Read as [`FromStr`] reads it.
impl<'de> serde::Deserialize<'de> for Priority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_severity() {
        assert!(Priority::Emergency > Priority::Critical);
        assert!(Priority::Critical > Priority::Warning);
        assert!(Priority::Informational > Priority::Debug);
        let mut all = Priority::ALL.to_vec();
        all.sort();
        assert_eq!(all.first(), Some(&Priority::Debug));
        assert_eq!(all.last(), Some(&Priority::Emergency));
    }

    #[test]
    fn parses_names_and_numbers() {
        assert_eq!("Critical".parse::<Priority>(), Ok(Priority::Critical));
        assert_eq!(
            "informational".parse::<Priority>(),
            Ok(Priority::Informational)
        );
        assert_eq!("INFO".parse::<Priority>(), Ok(Priority::Informational));
        assert!("Severe".parse::<Priority>().is_err());
        for (i, p) in Priority::ALL.iter().enumerate() {
            assert_eq!(Priority::from_number(i as i32), Ok(*p));
            assert_eq!(p.number(), i as i32);
            assert_eq!(p.as_str().to_ascii_lowercase(), p.as_lower_str());
        }
        assert_eq!(
            Priority::from_number(8),
            Err(PriorityError::UnknownNumber(8))
        );
        assert_eq!(
            Priority::from_number(-1),
            Err(PriorityError::UnknownNumber(-1))
        );
    }
}
