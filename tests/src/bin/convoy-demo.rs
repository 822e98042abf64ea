//! `convoy-demo`: boots a local fleet of three hosts with real systemd,
//! deploys v1, rolls v2 host by host, then shows a v3 whose health check
//! fails being restored and halted. Everything is removed at the end.
//! Run it with `scripts/demo`.

use anyhow::Result;
use convoy_tests::Testbed;

fn show(title: &str, out: &convoy_tests::testbed::CliOutput) {
    println!("\n$ {title}");
    print!("{}", out.stdout);
    if !out.stderr.is_empty() {
        print!("{}", out.stderr);
    }
    println!("(exit code {})", out.code);
}

fn main() -> Result<()> {
    println!("booting 3 hosts (systemd-nspawn, real systemd) and a controller ...");
    let bed = Testbed::boot(3)?;
    for h in &bed.hosts {
        println!("  {} at {} (agent connected)", h.name, h.ip);
    }
    for (v, mode) in [("1.0.0", "healthy"), ("2.0.0", "healthy"), ("3.0.0", "unhealthy")] {
        let file = bed.pack_demo(v, mode)?;
        show(
            &format!("convoy release push demo {v} demo-{v}.tar.gz   # packed as {mode}"),
            &bed.convoy(&["release", "push", "demo", v, file.to_str().unwrap()])?,
        );
    }
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        show(
            &format!("convoy deploy demo {v} --env staging"),
            &bed.convoy(&["deploy", "demo", v, "--env", "staging"])?,
        );
    }
    show("convoy status demo", &bed.convoy(&["status", "demo"])?);
    println!("\nwhat each host serves now:");
    for h in &bed.hosts {
        println!(
            "  {}: demo {}",
            h.name,
            h.serving().unwrap_or_else(|| "(no answer)".into())
        );
    }
    println!("\ntearing the fleet down ...");
    Ok(())
}
