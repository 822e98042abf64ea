-- The database convoy made just before migrations were versioned: every
-- column of the day, no user_version.
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS releases (
    app TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL,
    signature BLOB, pushed_by TEXT NOT NULL, pushed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, version));
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, app TEXT NOT NULL, version TEXT NOT NULL, environment TEXT NOT NULL,
    kind TEXT NOT NULL, strategy TEXT NOT NULL, hotfix_reason TEXT NOT NULL DEFAULT '',
        plan TEXT NOT NULL DEFAULT '', approved_by TEXT NOT NULL DEFAULT '',
    operator TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    started_at_ms INTEGER NOT NULL, finished_at_ms INTEGER);
CREATE INDEX IF NOT EXISTS rollouts_by_app ON rollouts (app, started_at_ms);
CREATE TABLE IF NOT EXISTS enroll_tokens (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, labels TEXT NOT NULL, expires_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL, created_at_ms INTEGER NOT NULL, used_at_ms INTEGER, used_by TEXT);
CREATE TABLE IF NOT EXISTS host_labels (host TEXT PRIMARY KEY, labels TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_hosts (host TEXT PRIMARY KEY, revoked_at_ms INTEGER NOT NULL, revoked_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_hosts (
    rollout_id TEXT NOT NULL, host TEXT NOT NULL, op_id TEXT NOT NULL, outcome TEXT NOT NULL,
    reason TEXT NOT NULL, restore_detail TEXT NOT NULL, finished_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, rollout_id TEXT NOT NULL, host TEXT NOT NULL, op_id TEXT NOT NULL,
    step TEXT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL, at_ms INTEGER NOT NULL);
INSERT INTO releases VALUES ('demo', '1.0.0', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 1234, NULL, 'operator:alice', 1700000000000);
