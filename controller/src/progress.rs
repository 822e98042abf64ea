//! How `deploy`, `rollback` and `watch` show a running rollout: on a
//! terminal a live view (indicatif): one progress bar per batch, a line
//! per host in flight with its current step, failures printed as they
//! happen; plain lines otherwise (pipes, logs, CI), which is also what
//! scripts and tests read.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub enum Progress {
    Lines,
    Bars(Bars),
    /// Nothing: the events go out as JSON lines instead.
    Quiet,
}

pub struct Bars {
    multi: MultiProgress,
    /// The rollout's current phase (the latest note) and its elapsed time.
    phase: ProgressBar,
    /// One bar per batch, filled as its hosts finish.
    batches: Vec<ProgressBar>,
    /// Which batch each host is in.
    batch_of: HashMap<String, usize>,
    /// Hosts whose switch has been counted in their batch.
    counted: std::collections::HashSet<String>,
    /// One line per host in flight: its latest step.
    hosts: HashMap<String, ProgressBar>,
}

impl Progress {
    /// Bars when stdout is a terminal, lines otherwise.
    pub fn for_stdout() -> Self {
        if std::io::stdout().is_terminal() {
            Progress::bars(ProgressDrawTarget::stdout())
        } else {
            Progress::Lines
        }
    }

    pub fn bars(target: ProgressDrawTarget) -> Self {
        let multi = MultiProgress::with_draw_target(target);
        let phase = multi.add(ProgressBar::new_spinner());
        phase.set_style(ProgressStyle::with_template("{spinner:.cyan} {elapsed:>4} {wide_msg}").expect("template"));
        phase.enable_steady_tick(Duration::from_millis(120));
        Progress::Bars(Bars {
            multi,
            phase,
            batches: vec![],
            batch_of: HashMap::new(),
            counted: Default::default(),
            hosts: HashMap::new(),
        })
    }

    /// A line that stays (the plan, the verdict).
    pub fn line(&self, s: &str) {
        match self {
            Progress::Lines => println!("{s}"),
            Progress::Bars(b) => {
                let _ = b.multi.println(s);
            }
            Progress::Quiet => {}
        }
    }

    /// The plan's batches: on a terminal, a bar for each.
    pub fn plan(&mut self, batches: &[Vec<String>]) {
        let Progress::Bars(b) = self else { return };
        let style = ProgressStyle::with_template("  batch {prefix:<6} [{bar:24}] {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> ");
        for (i, hosts) in batches.iter().enumerate() {
            let bar = b.multi.insert_before(&b.phase, ProgressBar::new(hosts.len() as u64));
            bar.set_style(style.clone());
            bar.set_prefix(format!("{}/{}", i + 1, batches.len()));
            bar.set_message(hosts.join(", "));
            for h in hosts {
                b.batch_of.insert(h.clone(), i);
            }
            b.batches.push(bar);
        }
    }

    /// A rollout note: batch started, baking, waiting for promotion, ...
    pub fn note(&self, s: &str) {
        if matches!(self, Progress::Quiet) {
            return;
        }
        self.line(&format!("-- {s}"));
        if let Progress::Bars(b) = self {
            b.phase.set_message(s.to_owned());
        }
    }

    /// A host's latest step.
    pub fn host(&mut self, host: &str, step: &str, kind: &str, message: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Lines => println!("  [{host}] {step:<8} {kind:<9} {message}"),
            Progress::Bars(b) => {
                let bar = b.bar(host);
                bar.set_message(format!("{step:<8} {kind:<9} {message}"));
                bar.tick();
            }
        }
    }

    /// A host's operation ended. `switch`: it was the host's activation
    /// or rollback (not its pre-staging), which its batch counts.
    pub fn result(&mut self, host: &str, outcome: &str, switch: bool) {
        match self {
            Progress::Quiet => {}
            Progress::Lines => println!("  [{host}] => {outcome}"),
            Progress::Bars(b) => {
                let ok = outcome == "succeeded";
                if let Some(bar) = b.hosts.remove(host) {
                    bar.finish_and_clear();
                }
                if !ok {
                    let _ = b.multi.println(format!("  ✘ {host}: {outcome}"));
                }
                if switch && b.counted.insert(host.to_owned()) {
                    if let Some(bar) = b.batch_of.get(host).and_then(|i| b.batches.get(*i)) {
                        bar.inc(1);
                        if bar.position() == bar.length().unwrap_or(0) {
                            bar.finish();
                        }
                    }
                }
            }
        }
    }

    /// Stops the live display, leaving each host's last line on screen.
    pub fn finish(&mut self) {
        if let Progress::Bars(b) = self {
            b.phase.finish_and_clear();
            for bar in b.hosts.values().chain(&b.batches) {
                bar.abandon();
            }
        }
    }
}

impl Bars {
    fn bar(&mut self, host: &str) -> ProgressBar {
        self.hosts
            .entry(host.to_owned())
            .or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(ProgressStyle::with_template("  {prefix:<12} {wide_msg}").expect("template"));
                bar.set_prefix(host.to_owned());
                bar
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A terminal that keeps what was drawn on it.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            100
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(&format!("{s}\n"));
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bars_show_each_host_and_its_outcome() {
        let screen = Screen::default();
        let mut p = Progress::bars(ProgressDrawTarget::term_like(Box::new(screen.clone())));
        p.line("rollout abc: web 2.0.0 to staging, 3 host(s)");
        p.plan(&[vec!["web1".into(), "web2".into()], vec!["web3".into()]]);
        p.result("web1", "succeeded", false);
        p.note("batch 1/2: web1, web2");
        p.host("web1", "check", "started", "http /health");
        p.host("web2", "restart", "started", "web.service");
        p.result("web1", "succeeded", true);
        p.result("web2", "failed_restored", true);
        p.finish();
        let drawn = screen.0.lock().unwrap().clone();
        assert!(drawn.contains("rollout abc: web 2.0.0 to staging"), "{drawn}");
        assert!(drawn.contains("-- batch 1/2: web1, web2"), "{drawn}");
        assert!(
            drawn.contains("restart  started   web.service"),
            "the host in flight: {drawn}"
        );
        assert!(drawn.contains("✘ web2: failed_restored"), "{drawn}");
        // web1's pre-staging result is not its switch; each switch counts once.
        let full = drawn.find("] 2/2 web1, web2").expect("batch 1 full");
        let staged = drawn.find("] 1/2 web1, web2").expect("one host counted");
        assert!(staged < full, "{drawn}");
        assert!(
            drawn[..drawn.find("-- batch 1/2").unwrap()].contains("] 0/2 web1, web2"),
            "{drawn}"
        );
        assert!(drawn[full..].contains("] 0/1 web3"), "{drawn}");
    }
}
