//! The fleet at a glance: for each app and environment, the releases its
//! hosts run, their health and connection, and the last rollout there.
//! Counted here, on the controller, so a dashboard of a large fleet gets a
//! small answer.

use std::collections::BTreeMap;

use convoy_common::ops::Health;
use convoy_proto::{FleetCell, FleetReply, RolloutRecord};

use super::registry::HostEntry;
use crate::db::RolloutRow;

pub fn fleet(hosts: &[HostEntry], last_rollouts: Vec<RolloutRow>) -> FleetReply {
    let mut cells: BTreeMap<(String, String), FleetCell> = BTreeMap::new();
    fn cell<'a>(cells: &'a mut BTreeMap<(String, String), FleetCell>, app: &str, env: &str) -> &'a mut FleetCell {
        cells
            .entry((app.to_owned(), env.to_owned()))
            .or_insert_with(|| FleetCell {
                app: app.to_owned(),
                environment: env.to_owned(),
                ..Default::default()
            })
    }
    let mut connected = 0;
    for h in hosts {
        let up = h.connected();
        connected += u32::from(up);
        let env = h.labels.get("env").map_or("", String::as_str);
        for (app, state) in &h.apps {
            let c = cell(&mut cells, app.as_str(), env);
            let version = state.current.as_ref().map(|v| v.to_string()).unwrap_or_default();
            *c.versions.entry(version).or_default() += 1;
            match (up, state.health) {
                (false, _) => c.disconnected += 1,
                (true, Health::Healthy) => c.healthy += 1,
                (true, Health::Unhealthy) => c.unhealthy += 1,
                (true, Health::Unknown) => c.unknown += 1,
            }
        }
    }
    for row in last_rollouts {
        let c = cell(&mut cells, &row.app, &row.env);
        c.last_rollout = Some(RolloutRecord::from(row));
    }
    FleetReply {
        cells: cells.into_values().collect(),
        hosts: hosts.len() as u32,
        connected,
    }
}
