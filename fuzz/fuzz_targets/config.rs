//! Config parsing: any text, read as an app spec, an agent config or a
//! controller config, is accepted or refused with an error that names the
//! file; it never panics.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../agent/src/config.rs"]
mod agent_config;
#[allow(dead_code)]
#[path = "../../controller/src/config.rs"]
mod controller_config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = convoy_common::spec::AppSpec::parse("app.toml", text) {
        assert!(e.to_string().contains("app.toml"), "{e}");
    }
    if let Err(e) = agent_config::Config::parse("agent.toml", text) {
        assert!(e.to_string().contains("agent.toml"), "{e}");
    }
    if let Err(e) = controller_config::Config::parse("controller.toml", text) {
        assert!(e.to_string().contains("controller.toml"), "{e}");
    }
});
