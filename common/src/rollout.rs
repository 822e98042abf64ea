//! Rollout strategies and how they cut an ordered list of hosts into
//! batches. Pure logic, shared by the controller and its tests.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An amount of hosts: a count or a percentage of the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Amount {
    Count(usize),
    Percent(u8),
}

impl Amount {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.parse().map_err(|_| format!("{s:?} is not a percentage"))?;
            if p == 0 || p > 100 {
                return Err(format!("{s:?}: a percentage must be 1% to 100%"));
            }
            Ok(Amount::Percent(p))
        } else if s == "rest" || s == "all" {
            Ok(Amount::Percent(100))
        } else {
            let n: usize = s
                .parse()
                .map_err(|_| format!("{s:?} is not a count or a percentage (e.g. 2 or 25%)"))?;
            Ok(Amount::Count(n))
        }
    }

    /// Hosts this amount means out of `n`; percentages round up.
    pub fn of(self, n: usize) -> usize {
        match self {
            Amount::Count(c) => c.min(n),
            Amount::Percent(p) => (n * p as usize).div_ceil(100),
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(c) => write!(f, "{c}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Fixed-size batches, one after the other (1 = host by host).
    Rolling { batch: Amount },
    /// Cumulative stages (e.g. 1, 10%, 50%, 100%) with a bake time after
    /// every stage but the last. Growing batches are stages without bake.
    Stages { stages: Vec<Amount>, bake: Duration },
    /// Every target at once.
    AllAtOnce,
}

impl Strategy {
    /// Parses `--strategy`, `--batch-size`, `--stages` and `--bake`.
    pub fn from_flags(
        strategy: &str,
        batch: Option<&str>,
        stages: Option<&str>,
        bake: Option<Duration>,
    ) -> Result<Self, String> {
        let no = |flag: &str| Err(format!("{flag} does not apply to --strategy {strategy}"));
        match strategy {
            "rolling" => {
                if stages.is_some() {
                    return no("--stages");
                }
                if bake.is_some() {
                    return no("--bake");
                }
                let batch = batch
                    .map(Amount::parse)
                    .transpose()
                    .map_err(|e| format!("--batch-size: {e}"))?
                    .unwrap_or(Amount::Count(1));
                if batch == Amount::Count(0) {
                    return Err("--batch-size must be at least 1".into());
                }
                Ok(Strategy::Rolling { batch })
            }
            "canary" | "stages" => {
                if batch.is_some() {
                    return no("--batch-size");
                }
                let stages = stages.ok_or("--stages is required, e.g. --stages 10%,50%,100%")?;
                let stages: Vec<Amount> = stages
                    .split(',')
                    .map(Amount::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("--stages: {e}"))?;
                if stages.last() != Some(&Amount::Percent(100)) {
                    return Err("the last stage must be 100% (or \"rest\")".into());
                }
                if stages.contains(&Amount::Count(0)) {
                    return Err("a stage cannot be 0 hosts".into());
                }
                Ok(Strategy::Stages {
                    stages,
                    bake: bake.unwrap_or_default(),
                })
            }
            "all-at-once" => {
                if batch.is_some() || stages.is_some() || bake.is_some() {
                    return no("--batch-size, --stages or --bake");
                }
                Ok(Strategy::AllAtOnce)
            }
            other => Err(format!(
                "unknown strategy {other:?} (expected rolling, canary or all-at-once; a deploy also takes blue-green)"
            )),
        }
    }

    /// Cuts `n` ordered targets into batches of indices; returns each batch
    /// with the bake time that follows it.
    pub fn batches(&self, n: usize) -> Vec<(std::ops::Range<usize>, Duration)> {
        let mut out = Vec::new();
        match self {
            Strategy::Rolling { batch } => {
                let size = batch.of(n).max(1);
                let mut i = 0;
                while i < n {
                    out.push((i..(i + size).min(n), Duration::ZERO));
                    i += size;
                }
            }
            Strategy::Stages { stages, bake } => {
                let mut done = 0;
                for s in stages {
                    let upto = s.of(n).max(done + 1).min(n);
                    if upto > done {
                        out.push((done..upto, *bake));
                        done = upto;
                    }
                }
                if let Some(last) = out.last_mut() {
                    last.1 = Duration::ZERO;
                }
            }
            Strategy::AllAtOnce => {
                if n > 0 {
                    out.push((0..n, Duration::ZERO));
                }
            }
        }
        out
    }

    /// Like [`Strategy::batches`], when the first `group` targets are a
    /// canary group: they go first, alone, followed by the stage bake (for
    /// a canary strategy), and the strategy cuts the rest.
    pub fn batches_after_group(&self, n: usize, group: usize) -> Vec<(std::ops::Range<usize>, Duration)> {
        let group = group.min(n);
        if group == 0 {
            return self.batches(n);
        }
        let bake = match self {
            Strategy::Stages { bake, .. } if group < n => *bake,
            _ => Duration::ZERO,
        };
        let mut out = vec![(0..group, bake)];
        out.extend(
            self.batches(n - group)
                .into_iter()
                .map(|(r, d)| (r.start + group..r.end + group, d)),
        );
        out
    }

    pub fn describe(&self) -> String {
        match self {
            Strategy::Rolling { batch } => format!("rolling, batches of {batch}"),
            Strategy::Stages { stages, bake } => {
                let s: Vec<String> = stages.iter().map(|a| a.to_string()).collect();
                if bake.is_zero() {
                    format!("stages {}", s.join(", "))
                } else {
                    format!(
                        "canary stages {} with {} bake",
                        s.join(", "),
                        humantime::format_duration(*bake)
                    )
                }
            }
            Strategy::AllAtOnce => "all at once".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(strategy: Strategy, n: usize, expect: &[usize]) {
        let sizes: Vec<usize> = strategy.batches(n).iter().map(|(r, _)| r.len()).collect();
        assert_eq!(sizes, expect, "{strategy:?} over {n}");
        let covered: usize = sizes.iter().sum();
        assert_eq!(covered, n, "every host exactly once");
    }

    fn stages(s: &str) -> Strategy {
        Strategy::from_flags("canary", None, Some(s), Some(Duration::from_secs(5))).unwrap()
    }

    #[test]
    fn batches() {
        let rolling = |b: &str| Strategy::from_flags("rolling", Some(b), None, None).unwrap();
        check(rolling("1"), 3, &[1, 1, 1]);
        check(rolling("2"), 5, &[2, 2, 1]);
        check(rolling("40%"), 5, &[2, 2, 1]);
        check(rolling("100%"), 4, &[4]);
        check(rolling("10"), 3, &[3]);
        check(stages("20%,100%"), 5, &[1, 4]);
        check(stages("1,10%,50%,rest"), 20, &[1, 1, 8, 10]);
        check(stages("1,10%,50%,100%"), 3, &[1, 1, 1]);
        check(stages("50%,100%"), 1, &[1]);
        check(Strategy::AllAtOnce, 7, &[7]);
        check(Strategy::AllAtOnce, 0, &[]);
    }

    #[test]
    fn bake_follows_every_stage_but_the_last() {
        let b = stages("20%,60%,100%").batches(5);
        let bakes: Vec<u64> = b.iter().map(|(_, d)| d.as_secs()).collect();
        assert_eq!(bakes, vec![5, 5, 0]);
    }

    #[test]
    fn a_canary_group_goes_first_alone() {
        let b = stages("50%,100%").batches_after_group(7, 2);
        let got: Vec<(std::ops::Range<usize>, u64)> = b.into_iter().map(|(r, d)| (r, d.as_secs())).collect();
        assert_eq!(got, vec![(0..2, 5), (2..5, 5), (5..7, 0)]);
        let rolling = Strategy::from_flags("rolling", Some("2"), None, None).unwrap();
        let sizes: Vec<usize> = rolling.batches_after_group(5, 1).iter().map(|(r, _)| r.len()).collect();
        assert_eq!(sizes, vec![1, 2, 2]);
        // A group that is every target is one batch, with nothing to bake for.
        let all = stages("100%").batches_after_group(3, 3);
        assert_eq!(all, vec![(0..3, Duration::ZERO)]);
        assert_eq!(stages("100%").batches_after_group(3, 0), stages("100%").batches(3));
    }

    #[test]
    fn bad_flags() {
        let err = |s: &str, b: Option<&str>, st: Option<&str>| Strategy::from_flags(s, b, st, None).unwrap_err();
        assert!(err("blue-green", None, None).contains("unknown strategy"));
        assert!(err("rolling", Some("0"), None).contains("at least 1"));
        assert!(err("rolling", Some("150%"), None).contains("1% to 100%"));
        assert!(err("rolling", Some("two"), None).contains("not a count"));
        assert!(err("canary", None, None).contains("--stages is required"));
        assert!(err("canary", None, Some("10%,50%")).contains("last stage must be 100%"));
        assert!(err("all-at-once", Some("2"), None).contains("does not apply"));
    }
}
