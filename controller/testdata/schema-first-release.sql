-- The database the first convoy release made (commit e1a8f33), with a
-- finished rollout in it. No user_version: migrations were not versioned.
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS releases (
    app TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL,
    pushed_by TEXT NOT NULL, pushed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, version));
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, app TEXT NOT NULL, version TEXT NOT NULL, environment TEXT NOT NULL,
    operator TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    started_at_ms INTEGER NOT NULL, finished_at_ms INTEGER);
CREATE TABLE IF NOT EXISTS rollout_hosts (
    rollout_id TEXT NOT NULL, host TEXT NOT NULL, op_id TEXT NOT NULL, outcome TEXT NOT NULL,
    reason TEXT NOT NULL, restore_detail TEXT NOT NULL, finished_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, rollout_id TEXT NOT NULL, host TEXT NOT NULL, op_id TEXT NOT NULL,
    step TEXT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL, at_ms INTEGER NOT NULL);
INSERT INTO releases VALUES ('demo', '1.0.0', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 1234, 'operator:alice', 1700000000000);
INSERT INTO rollouts VALUES ('0123456789ab', 'demo', '1.0.0', 'staging', 'operator:alice', 'succeeded', '', 1700000000000, 1700000060000);
INSERT INTO rollout_hosts VALUES ('0123456789ab', 'web1', '0123456789ab-web1', 'succeeded', '', '', 1700000050000);
INSERT INTO events (rollout_id, host, op_id, step, kind, message, at_ms) VALUES ('0123456789ab', 'web1', '0123456789ab-web1', 'stage', 'started', 'fetching', 1700000010000);
