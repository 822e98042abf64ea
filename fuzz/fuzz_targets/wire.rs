//! Message decoding: any bytes, decoded as either side's session message
//! and converted to domain types as the agent and controller do, must be
//! refused or accepted without a panic; whatever is accepted satisfies
//! the domain types' own checks (names, versions, paths).

#![no_main]

use convoy_common::ops::{ActivateCommand, AppStatus, OpReport, RollbackCommand, StepEvent};
use convoy_proto::{agent_message, controller_message, AgentMessage, ControllerMessage};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ControllerMessage::decode(data) {
        match m.body {
            Some(controller_message::Body::Activate(a)) | Some(controller_message::Body::Stage(a)) => {
                if let Ok(cmd) = ActivateCommand::try_from(a) {
                    // What was accepted round-trips unchanged.
                    let back = ActivateCommand::try_from(convoy_proto::Activate::from(&cmd)).expect("round trip");
                    assert_eq!(back.version, cmd.version);
                    assert_eq!(back.spec.install_path, cmd.spec.install_path);
                    assert!(cmd.spec.install_path.is_absolute());
                }
            }
            Some(controller_message::Body::Rollback(r)) => {
                let _ = RollbackCommand::try_from(r);
            }
            _ => {}
        }
    }
    if let Ok(m) = AgentMessage::decode(data) {
        match m.body {
            Some(agent_message::Body::Hello(h)) => {
                for a in h.apps {
                    let _ = AppStatus::try_from(a);
                }
                for r in h.recent_results {
                    let _ = OpReport::try_from(r);
                }
            }
            Some(agent_message::Body::Heartbeat(h)) => {
                for a in h.apps {
                    let _ = AppStatus::try_from(a);
                }
            }
            Some(agent_message::Body::Event(e)) => {
                let _ = StepEvent::try_from(e);
            }
            Some(agent_message::Body::Result(r)) => {
                let _ = OpReport::try_from(r);
            }
            None => {}
        }
    }
});
