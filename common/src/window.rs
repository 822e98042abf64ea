//! Deploy windows: when an app's rollouts may start, e.g.
//! `"Mon-Thu 09:00-16:00 Europe/Berlin"`.
//!
//! A window is days (`Mon-Thu`, `Mon,Wed,Fri`, `Sat-Sun`, or `*` for every
//! day), a start and an end time of day on the same day (`HH:MM-HH:MM`,
//! the end excluded), and an IANA time zone (default `UTC`). Daylight
//! saving follows the zone.

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// As written in the spec.
    pub text: String,
    days: [bool; 7],
    start: Time,
    end: Time,
    zone: TimeZone,
}

const DAYS: [(&str, Weekday); 7] = [
    ("Mon", Weekday::Monday),
    ("Tue", Weekday::Tuesday),
    ("Wed", Weekday::Wednesday),
    ("Thu", Weekday::Thursday),
    ("Fri", Weekday::Friday),
    ("Sat", Weekday::Saturday),
    ("Sun", Weekday::Sunday),
];

fn day(name: &str) -> Result<usize, String> {
    DAYS.iter()
        .position(|(n, _)| n.eq_ignore_ascii_case(name))
        .ok_or_else(|| format!("{name:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"))
}

fn time(text: &str) -> Result<Time, String> {
    let (h, m) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not a time of day (HH:MM)"))?;
    let h: i8 = h
        .parse()
        .map_err(|_| format!("{text:?} is not a time of day (HH:MM)"))?;
    let m: i8 = m
        .parse()
        .map_err(|_| format!("{text:?} is not a time of day (HH:MM)"))?;
    if h == 24 && m == 0 {
        return Ok(Time::MAX);
    }
    Time::new(h, m, 0, 0).map_err(|_| format!("{text:?} is not a time of day (00:00 to 24:00)"))
}

impl Window {
    pub fn parse(text: &str) -> Result<Window, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let (days_text, hours, zone_name) = match parts.as_slice() {
            [d, h] => (*d, *h, "UTC"),
            [d, h, z] => (*d, *h, *z),
            _ => {
                return Err(format!(
                "{text:?} is not a window: write DAYS HH:MM-HH:MM [ZONE], e.g. \"Mon-Thu 09:00-16:00 Europe/Berlin\""
            ))
            }
        };
        let mut days = [false; 7];
        if days_text == "*" {
            days = [true; 7];
        } else {
            for item in days_text.split(',') {
                match item.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (day(a)?, day(b)?);
                        if a > b {
                            return Err(format!(
                                "{item:?}: the range runs backwards (write Mon-Fri, or Sat-Sun)"
                            ));
                        }
                        days[a..=b].iter_mut().for_each(|d| *d = true);
                    }
                    None => days[day(item)?] = true,
                }
            }
        }
        let (from, to) = hours
            .split_once('-')
            .ok_or_else(|| format!("{hours:?} is not a span of hours (HH:MM-HH:MM)"))?;
        let (start, end) = (time(from)?, time(to)?);
        if end <= start {
            return Err(format!(
                "{hours:?}: the window must end after it starts on the same day; split one that crosses midnight in two"
            ));
        }
        let zone = TimeZone::get(zone_name).map_err(|e| format!("{zone_name:?} is not a time zone: {e}"))?;
        Ok(Window {
            text: text.to_owned(),
            days,
            start,
            end,
            zone,
        })
    }

    /// Whether `at` falls inside the window.
    pub fn contains(&self, at: Timestamp) -> bool {
        let local = at.to_zoned_datetime(self.zone.clone());
        let weekday = local.weekday().to_monday_zero_offset() as usize;
        let t = local.time();
        self.days[weekday] && t >= self.start && (t < self.end || (self.end == Time::MAX && t <= self.end))
    }

    /// `at` as the window's zone reads it, e.g. `Tue 17:05 Europe/Berlin`.
    pub fn local(&self, at: Timestamp) -> String {
        let z = at.to_zoned_datetime(self.zone.clone());
        format!(
            "{} {} {}",
            DAYS[z.weekday().to_monday_zero_offset() as usize].0,
            z.strftime("%H:%M"),
            self.zone.iana_name().unwrap_or("UTC")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn windows_follow_their_zone_and_days() {
        let w = Window::parse("Mon-Thu 09:00-16:00 Europe/Berlin").unwrap();
        // Tuesday 2026-12-01, 08:30 UTC is 09:30 in Berlin (CET, +1).
        assert!(w.contains(at("2026-12-01T08:30:00Z")));
        assert!(!w.contains(at("2026-12-01T07:30:00Z")), "08:30 in Berlin");
        assert!(
            !w.contains(at("2026-12-01T15:00:00Z")),
            "16:00 in Berlin: the end is excluded"
        );
        // Friday.
        assert!(!w.contains(at("2026-12-04T10:00:00Z")));
        // Summer time: 07:30 UTC is 09:30 CEST.
        assert!(w.contains(at("2026-07-07T07:30:00Z")));
        assert_eq!(w.local(at("2026-12-01T16:05:00Z")), "Tue 17:05 Europe/Berlin");

        let weekend = Window::parse("Sat,Sun 00:00-24:00").unwrap();
        assert!(weekend.contains(at("2026-12-05T23:59:30Z")));
        assert!(!weekend.contains(at("2026-12-04T23:59:30Z")));
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        for (text, expect) in [
            ("Mon-Thu", "is not a window"),
            ("Mon-Xyz 09:00-10:00", "\"Xyz\" is not a day"),
            ("Fri-Mon 09:00-10:00", "runs backwards"),
            ("Mon 9-10", "is not a time of day"),
            ("Mon 25:00-26:00", "is not a time of day"),
            ("Mon 22:00-02:00", "split one that crosses midnight"),
            ("Mon 09:00-10:00 Mars/Olympus", "is not a time zone"),
        ] {
            let e = Window::parse(text).unwrap_err();
            assert!(e.contains(expect), "{text}: {e}");
        }
    }
}
