//! The retry schedule: when each attempt of a delivery is due, relative to the previous failure.

use std::time::Duration;

/// Delays before each attempt: the first entry is the delay of attempt 1 after publishing
/// (normally zero), entry `n` the delay of attempt `n + 1` after attempt `n` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

/// A schedule that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("the retry schedule is empty")]
    Empty,
    #[error("invalid duration {0:?} in the retry schedule: {1}")]
    Duration(String, String),
    #[error("the retry schedule has {0} entries; at most 50 are allowed")]
    TooLong(usize),
}

impl Default for RetrySchedule {
    /// Immediately, then after 1 min, 5 min, 30 min, 2 h and 8 h: six attempts.
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        RetrySchedule(vec![Duration::ZERO, m(1), m(5), m(30), m(120), m(480)])
    }
}

impl std::str::FromStr for RetrySchedule {
    type Err = ScheduleError;

    /// Parses `0s,1m,5m,30m,2h,8h` (durations in `humantime` syntax, `ms` included).
    fn from_str(s: &str) -> Result<Self, ScheduleError> {
        let delays = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| humantime::parse_duration(p).map_err(|e| ScheduleError::Duration(p.to_owned(), e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        match delays.len() {
            0 => Err(ScheduleError::Empty),
            n if n > 50 => Err(ScheduleError::TooLong(n)),
            _ => Ok(RetrySchedule(delays)),
        }
    }
}

impl std::fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|d| humantime::format_duration(*d).to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

impl RetrySchedule {
    /// How many attempts a delivery gets.
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }

    /// The delay before attempt `n` (1-based): for `n = 1` the delay after publishing, otherwise
    /// after attempt `n - 1` failed. `None` once the schedule is exhausted.
    pub fn delay_before(&self, n: u32) -> Option<Duration> {
        let index = usize::try_from(n.checked_sub(1)?).ok()?;
        self.0.get(index).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_documented_schedule() {
        let s = RetrySchedule::default();
        assert_eq!(s, "0s,1m,5m,30m,2h,8h".parse().unwrap());
        assert_eq!(s.attempts(), 6);
        assert_eq!(s.delay_before(1), Some(Duration::ZERO));
        assert_eq!(s.delay_before(2), Some(Duration::from_secs(60)));
        assert_eq!(s.delay_before(6), Some(Duration::from_secs(8 * 3600)));
        assert_eq!(s.delay_before(7), None);
        assert_eq!(s.delay_before(0), None);
    }

    #[test]
    fn compressed_schedules_parse() {
        let s: RetrySchedule = "0s, 200ms ,1s".parse().unwrap();
        assert_eq!(s.delay_before(2), Some(Duration::from_millis(200)));
        assert_eq!(s.to_string(), "0s,200ms,1s");
    }

    #[test]
    fn bad_schedules_are_refused() {
        assert_eq!("".parse::<RetrySchedule>(), Err(ScheduleError::Empty));
        assert!(matches!("1m,soon".parse::<RetrySchedule>(), Err(ScheduleError::Duration(p, _)) if p == "soon"));
    }
}
