"""The schema: numbered migrations, one list per backend, numbered alike.

Migration n of one backend makes the same tables, columns and indexes as migration n of
the other, in that engine's words: PostgreSQL has no implicit rowid (a column of that
name keeps insertion order), no REAL of eight bytes (DOUBLE PRECISION), and booleans.
A database records how many it has applied (SQLite: user_version; PostgreSQL: the
schema_version table) and each start applies the rest.
"""

from __future__ import annotations

SQLITE: tuple[str, ...] = (
    # 1: API keys, verifications, calls and their event timeline.
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,      -- SHA-256 of the key; the key is shown once
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE verifications (
        id TEXT PRIMARY KEY,
        api_key_id TEXT NOT NULL,
        phone TEXT NOT NULL,                -- E.164
        region TEXT NOT NULL,
        reference TEXT,
        callback_url TEXT,
        status TEXT NOT NULL,
        code_hash TEXT NOT NULL,            -- HMAC of the code; the code itself is never stored
        pool TEXT NOT NULL,
        cli_prefix TEXT NOT NULL,
        cli_length INTEGER NOT NULL,
        cli_pattern TEXT NOT NULL,
        attempts_remaining INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX verifications_by_phone ON verifications (phone, created_at);
    CREATE INDEX verifications_pending ON verifications (expires_at) WHERE status = 'pending';
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,                -- the ChannelId given to Originate
        verification_id TEXT NOT NULL UNIQUE REFERENCES verifications (id),
        status TEXT NOT NULL,
        dial_number TEXT NOT NULL,
        ring_seconds REAL NOT NULL,
        outcome TEXT,
        hangup_cause INTEGER,
        sip_code INTEGER,
        reason TEXT,
        queued_at REAL NOT NULL,
        dialed_at REAL,
        ringing_at REAL,
        ended_at REAL
    );
    CREATE INDEX calls_live ON calls (status) WHERE status IN ('queued', 'dialing', 'ringing');
    CREATE TABLE call_events (
        call_id TEXT NOT NULL REFERENCES calls (id),
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        cause INTEGER,
        sip_code INTEGER
    );
    CREATE INDEX call_events_by_call ON call_events (call_id, at);
    """,
    # 2: what each call taught about its number, and the carrier for statistics.
    """
    ALTER TABLE verifications ADD COLUMN carrier TEXT;
    CREATE TABLE number_health (
        phone TEXT PRIMARY KEY,             -- E.164
        status TEXT NOT NULL,               -- unknown | reachable | unreachable | invalid
        last_outcome TEXT,
        last_cause INTEGER,
        last_sip_code INTEGER,
        last_call_at REAL,
        last_delivered_at REAL,
        calls INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE INDEX number_health_by_status ON number_health (status, phone);
    CREATE INDEX calls_by_end ON calls (ended_at);
    """,
    # 3: what the abuse limits count, and where each API key may be used from.
    """
    ALTER TABLE verifications ADD COLUMN phone_prefix TEXT;
    ALTER TABLE verifications ADD COLUMN failed_checks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE api_keys ADD COLUMN allowed_networks TEXT;   -- CIDRs, comma-separated
    CREATE INDEX verifications_by_prefix ON verifications (phone_prefix, created_at);
    CREATE INDEX verifications_by_key ON verifications (api_key_id, created_at);
    CREATE INDEX verifications_by_time ON verifications (created_at);
    """,
    # 4: Idempotency-Key: the first response to a key, replayed for its retries.
    """
    CREATE TABLE idempotency_keys (
        api_key_id TEXT NOT NULL,
        key TEXT NOT NULL,
        body_hash TEXT NOT NULL,            -- SHA-256 of the canonical JSON body
        status INTEGER NOT NULL,
        response TEXT NOT NULL,             -- the exact body first answered
        created_at REAL NOT NULL,
        PRIMARY KEY (api_key_id, key)
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
    """,
    # 5: the webhook outbox, written in the transaction of the change it reports.
    """
    CREATE TABLE webhook_outbox (
        id TEXT PRIMARY KEY,                -- webhook-id: the same on every redelivery
        verification_id TEXT NOT NULL REFERENCES verifications (id),
        url TEXT NOT NULL,
        type TEXT NOT NULL,                 -- verification.delivered, ...
        payload TEXT,                       -- fixed at the first attempt, then resent as is
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_status INTEGER,
        last_error TEXT,
        delivered_at REAL,
        given_up_at REAL
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
        WHERE delivered_at IS NULL AND given_up_at IS NULL;
    CREATE INDEX webhook_outbox_by_verification ON webhook_outbox (verification_id);
    """,
    # 6: sandbox verifications (config test_numbers): never dialed, fixed code.
    """
    ALTER TABLE verifications ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 0;
    """,
    # 7: what every create looks up stays small as the history grows (make bench).
    # A phone's pending verifications (superseded by a new one), without its history.
    # Calls per API key and minute: the rolling day's budget sums at most 1,441 rows
    # instead of walking up to key_daily_calls verifications.
    """
    CREATE INDEX verifications_pending_by_phone ON verifications (phone, api_key_id)
        WHERE status = 'pending';
    DROP INDEX verifications_by_key;        -- its one reader now reads key_usage
    CREATE TABLE key_usage (
        api_key_id TEXT NOT NULL,
        minute INTEGER NOT NULL,            -- unix time // 60
        calls INTEGER NOT NULL,
        PRIMARY KEY (api_key_id, minute)
    ) WITHOUT ROWID;
    INSERT INTO key_usage (api_key_id, minute, calls)
        SELECT api_key_id, CAST(created_at / 60 AS INTEGER), COUNT(*) FROM verifications
        WHERE NOT sandbox GROUP BY 1, 2;
    """,
    # 8: the global and per-prefix windows in O(log n) whatever their count: every
    # dialed verification is numbered, overall and within its prefix, so the count-th
    # latest is one index lookup instead of a walk of `count` rows.
    """
    ALTER TABLE verifications ADD COLUMN global_seq INTEGER;
    ALTER TABLE verifications ADD COLUMN prefix_seq INTEGER;
    UPDATE verifications SET global_seq = n.g, prefix_seq = n.p
        FROM (SELECT id,
                     ROW_NUMBER() OVER (ORDER BY created_at, rowid) AS g,
                     ROW_NUMBER() OVER (PARTITION BY phone_prefix
                                        ORDER BY created_at, rowid) AS p
              FROM verifications WHERE NOT sandbox) AS n
        WHERE verifications.id = n.id;
    UPDATE verifications SET prefix_seq = NULL WHERE phone_prefix IS NULL;
    CREATE UNIQUE INDEX verifications_global_seq ON verifications (global_seq)
        WHERE global_seq IS NOT NULL;
    CREATE UNIQUE INDEX verifications_prefix_seq ON verifications (phone_prefix, prefix_seq)
        WHERE prefix_seq IS NOT NULL;
    DROP INDEX verifications_by_prefix;
    DROP INDEX verifications_by_time;
    """,
    # 9: API key scopes and failed checks per key
    # Keys made before scopes keep every right they had (admin); new keys say theirs.
    # A wrong check is a row of its own, at the time it was made, so the windows over
    # them count by key or across keys, and an admin can forget a phone's.
    """
    ALTER TABLE api_keys ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin';  -- verify | admin
    CREATE TABLE check_failures (
        phone TEXT NOT NULL,                -- E.164
        api_key_id TEXT NOT NULL,
        at REAL NOT NULL,
        failures INTEGER NOT NULL           -- 1; more only for the rows carried over here
    );
    CREATE INDEX check_failures_by_phone ON check_failures (phone, at);
    CREATE INDEX check_failures_by_time ON check_failures (at);
    INSERT INTO check_failures (phone, api_key_id, at, failures)
        SELECT phone, api_key_id, updated_at, failed_checks FROM verifications
        WHERE failed_checks > 0
        AND updated_at > CAST(strftime('%s', 'now') AS REAL) - 30 * 86400;
    """,
    # 10: many gateways on one database. Each call has an owner (the instance that
    # places and follows it) and the Asterisk node it is on; each instance a lease it
    # renews, past which the others adopt its calls.
    """
    ALTER TABLE calls ADD COLUMN owner TEXT;
    ALTER TABLE calls ADD COLUMN node TEXT;
    CREATE INDEX calls_live_by_owner ON calls (owner)
        WHERE status IN ('queued', 'dialing', 'ringing');
    CREATE TABLE instances (
        name TEXT PRIMARY KEY,              -- instance.name
        incarnation TEXT NOT NULL,          -- new at each start: one name, one process
        started_at REAL NOT NULL,
        lease_until REAL NOT NULL,
        stopped_at REAL
    );
    """,
    # 11: a webhook event keeps the verification as it was when the event happened
    # (records.Snapshot, JSON); the payload is still rendered at the first attempt.
    """
    ALTER TABLE webhook_outbox ADD COLUMN snapshot TEXT;
    """,
    # 12: a verification tries its channels in order (flashcall, voice): one call per
    # step, so calls.verification_id is no longer unique; (verification_id, step) is.
    # The verification says which step is current, when the next one is due and, for a
    # verification with a voice step, its code sealed (gateway.seal): the voice call
    # speaks it, maybe long after the caller ID that carried it was given back.
    # SQLite cannot drop a UNIQUE constraint: calls is made anew. With foreign keys on
    # (always, here) dropping a parent of rows fails and renaming a table rewrites the
    # references to it, so call_events is made anew too, referencing the new calls.
    """
    ALTER TABLE verifications ADD COLUMN channels TEXT NOT NULL DEFAULT 'flashcall';
    ALTER TABLE verifications ADD COLUMN locale TEXT;
    ALTER TABLE verifications ADD COLUMN fallback_after REAL;
    ALTER TABLE verifications ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE verifications ADD COLUMN next_at REAL;
    ALTER TABLE verifications ADD COLUMN next_asked_at REAL;
    ALTER TABLE verifications ADD COLUMN code_sealed TEXT;
    CREATE INDEX verifications_next_due ON verifications (next_at) WHERE next_at IS NOT NULL;
    CREATE TABLE calls_new (
        id TEXT PRIMARY KEY,                -- the ChannelId given to Originate
        verification_id TEXT NOT NULL REFERENCES verifications (id),
        status TEXT NOT NULL,
        dial_number TEXT NOT NULL,
        ring_seconds REAL NOT NULL,
        outcome TEXT,
        hangup_cause INTEGER,
        sip_code INTEGER,
        reason TEXT,
        queued_at REAL NOT NULL,
        dialed_at REAL,
        ringing_at REAL,
        ended_at REAL,
        owner TEXT,
        node TEXT,
        channel TEXT NOT NULL DEFAULT 'flashcall',  -- flashcall | voice
        step INTEGER NOT NULL DEFAULT 0,    -- its place in the verification's channels
        UNIQUE (verification_id, step)
    );
    INSERT INTO calls_new (id, verification_id, status, dial_number, ring_seconds, outcome,
                           hangup_cause, sip_code, reason, queued_at, dialed_at, ringing_at,
                           ended_at, owner, node)
        SELECT id, verification_id, status, dial_number, ring_seconds, outcome,
               hangup_cause, sip_code, reason, queued_at, dialed_at, ringing_at,
               ended_at, owner, node FROM calls;
    CREATE TABLE call_events_new (
        call_id TEXT NOT NULL REFERENCES calls_new (id),
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        cause INTEGER,
        sip_code INTEGER
    );
    INSERT INTO call_events_new (call_id, at, kind, cause, sip_code)
        SELECT call_id, at, kind, cause, sip_code FROM call_events ORDER BY rowid;
    DROP TABLE call_events;
    DROP TABLE calls;
    ALTER TABLE calls_new RENAME TO calls;
    ALTER TABLE call_events_new RENAME TO call_events;
    CREATE INDEX call_events_by_call ON call_events (call_id, at);
    CREATE INDEX calls_live ON calls (status) WHERE status IN ('queued', 'dialing', 'ringing');
    CREATE INDEX calls_by_end ON calls (ended_at);
    CREATE INDEX calls_live_by_owner ON calls (owner)
        WHERE status IN ('queued', 'dialing', 'ringing');
    CREATE TABLE voice_usage (              -- voice calls per API key and minute
        api_key_id TEXT NOT NULL,
        minute INTEGER NOT NULL,
        calls INTEGER NOT NULL,
        PRIMARY KEY (api_key_id, minute)
    ) WITHOUT ROWID;
    """,
    # 13: how the approving code was obtained (a check's `source`: intercepted by an app
    # from the call log, or typed), and how long an app should watch the call log.
    """
    ALTER TABLE verifications ADD COLUMN check_source TEXT;   -- intercepted | manual
    ALTER TABLE verifications ADD COLUMN watch_seconds REAL;
    """,
    # 14: what calls taught about each pool's route to each carrier (caller_health);
    # verifications created and approved per destination block and minute, with the
    # block's carrier and country (the conversion watch); its alerts.
    """
    CREATE TABLE pool_health (
        pool TEXT NOT NULL,
        carrier TEXT NOT NULL,              -- '' when phonenumbers names none
        state TEXT NOT NULL,                -- active | quarantined | probing
        since REAL NOT NULL,
        failures INTEGER NOT NULL,          -- failed calls in a row
        recent TEXT NOT NULL,               -- latest verdicts, oldest first: d or f
        held INTEGER NOT NULL,              -- failing, kept: no other pool delivers
        probe_at REAL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (carrier, pool)
    ) WITHOUT ROWID;
    CREATE TABLE conversion (
        block TEXT NOT NULL,                -- the phone without its hidden digits
        minute INTEGER NOT NULL,            -- of creation, in minutes since the epoch
        carrier TEXT NOT NULL,
        region TEXT NOT NULL,
        created INTEGER NOT NULL,
        approved INTEGER NOT NULL,
        PRIMARY KEY (block, minute)
    ) WITHOUT ROWID;
    CREATE INDEX conversion_by_minute ON conversion (minute);
    CREATE TABLE alerts (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,                 -- block | carrier | country
        target TEXT NOT NULL,
        created INTEGER NOT NULL,
        approved INTEGER NOT NULL,
        mode TEXT NOT NULL,                 -- report | block
        raised_at REAL NOT NULL,
        blocked_until REAL,
        cleared_at REAL,
        cleared_by TEXT                     -- admin | expired | recovered
    );
    CREATE UNIQUE INDEX alerts_open ON alerts (kind, target) WHERE cleared_at IS NULL;
    CREATE INDEX alerts_by_raised ON alerts (raised_at);
    """,
    # 15: calls_live (live calls by status) goes: calls_live_by_owner holds the same
    # rows, and every status change of a call moved its entry in both (make bench).
    """
    DROP INDEX calls_live;
    """,
    # 16: calls_by_end holds ended calls only: a call not yet ended had an entry at its
    # create that its end moved, two pages written more per call (make bench). The live
    # ones are calls_live_by_owner's.
    """
    DROP INDEX calls_by_end;
    CREATE INDEX calls_by_end ON calls (ended_at) WHERE ended_at IS NOT NULL;
    """,
)


POSTGRESQL: tuple[str, ...] = (
    # 1: API keys, verifications, calls and their event timeline.
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE TABLE verifications (
        id TEXT PRIMARY KEY,
        rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,  -- insertion order (retention)
        api_key_id TEXT NOT NULL,
        phone TEXT NOT NULL,
        region TEXT NOT NULL,
        reference TEXT,
        callback_url TEXT,
        status TEXT NOT NULL,
        code_hash TEXT NOT NULL,
        pool TEXT NOT NULL,
        cli_prefix TEXT NOT NULL,
        cli_length INTEGER NOT NULL,
        cli_pattern TEXT NOT NULL,
        attempts_remaining INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX verifications_by_phone ON verifications (phone, created_at);
    CREATE INDEX verifications_pending ON verifications (expires_at) WHERE status = 'pending';
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,
        verification_id TEXT NOT NULL UNIQUE REFERENCES verifications (id),
        status TEXT NOT NULL,
        dial_number TEXT NOT NULL,
        ring_seconds DOUBLE PRECISION NOT NULL,
        outcome TEXT,
        hangup_cause INTEGER,
        sip_code INTEGER,
        reason TEXT,
        queued_at DOUBLE PRECISION NOT NULL,
        dialed_at DOUBLE PRECISION,
        ringing_at DOUBLE PRECISION,
        ended_at DOUBLE PRECISION
    );
    CREATE INDEX calls_live ON calls (status) WHERE status IN ('queued', 'dialing', 'ringing');
    CREATE TABLE call_events (
        rowid BIGINT GENERATED ALWAYS AS IDENTITY,
        call_id TEXT NOT NULL REFERENCES calls (id),
        at DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL,
        cause INTEGER,
        sip_code INTEGER
    );
    CREATE INDEX call_events_by_call ON call_events (call_id, at);
    """,
    # 2: what each call taught about its number, and the carrier for statistics.
    """
    ALTER TABLE verifications ADD COLUMN carrier TEXT;
    CREATE TABLE number_health (
        phone TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        last_outcome TEXT,
        last_cause INTEGER,
        last_sip_code INTEGER,
        last_call_at DOUBLE PRECISION,
        last_delivered_at DOUBLE PRECISION,
        calls INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX number_health_by_status ON number_health (status, phone);
    CREATE INDEX calls_by_end ON calls (ended_at);
    """,
    # 3: what the abuse limits count, and where each API key may be used from.
    """
    ALTER TABLE verifications ADD COLUMN phone_prefix TEXT;
    ALTER TABLE verifications ADD COLUMN failed_checks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE api_keys ADD COLUMN allowed_networks TEXT;
    CREATE INDEX verifications_by_prefix ON verifications (phone_prefix, created_at);
    CREATE INDEX verifications_by_key ON verifications (api_key_id, created_at);
    CREATE INDEX verifications_by_time ON verifications (created_at);
    """,
    # 4: Idempotency-Key: the first response to a key, replayed for its retries.
    """
    CREATE TABLE idempotency_keys (
        api_key_id TEXT NOT NULL,
        key TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        status INTEGER NOT NULL,
        response TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (api_key_id, key)
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
    """,
    # 5: the webhook outbox, written in the transaction of the change it reports.
    """
    CREATE TABLE webhook_outbox (
        id TEXT PRIMARY KEY,
        rowid BIGINT GENERATED ALWAYS AS IDENTITY,
        verification_id TEXT NOT NULL REFERENCES verifications (id),
        url TEXT NOT NULL,
        type TEXT NOT NULL,
        payload TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_status INTEGER,
        last_error TEXT,
        delivered_at DOUBLE PRECISION,
        given_up_at DOUBLE PRECISION
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
        WHERE delivered_at IS NULL AND given_up_at IS NULL;
    CREATE INDEX webhook_outbox_by_verification ON webhook_outbox (verification_id);
    """,
    # 6: sandbox verifications (config test_numbers): never dialed, fixed code.
    """
    ALTER TABLE verifications ADD COLUMN sandbox BOOLEAN NOT NULL DEFAULT false;
    """,
    # 7: what every create looks up stays small as the history grows.
    """
    CREATE INDEX verifications_pending_by_phone ON verifications (phone, api_key_id)
        WHERE status = 'pending';
    DROP INDEX verifications_by_key;
    CREATE TABLE key_usage (
        api_key_id TEXT NOT NULL,
        minute INTEGER NOT NULL,
        calls INTEGER NOT NULL,
        PRIMARY KEY (api_key_id, minute)
    );
    INSERT INTO key_usage (api_key_id, minute, calls)
        SELECT api_key_id, FLOOR(created_at / 60)::INTEGER, COUNT(*) FROM verifications
        WHERE NOT sandbox GROUP BY 1, 2;
    """,
    # 8: the global and per-prefix windows in O(log n) whatever their count.
    """
    ALTER TABLE verifications ADD COLUMN global_seq BIGINT;
    ALTER TABLE verifications ADD COLUMN prefix_seq BIGINT;
    UPDATE verifications SET global_seq = n.g, prefix_seq = n.p
        FROM (SELECT id,
                     ROW_NUMBER() OVER (ORDER BY created_at, rowid) AS g,
                     ROW_NUMBER() OVER (PARTITION BY phone_prefix
                                        ORDER BY created_at, rowid) AS p
              FROM verifications WHERE NOT sandbox) AS n
        WHERE verifications.id = n.id;
    UPDATE verifications SET prefix_seq = NULL WHERE phone_prefix IS NULL;
    CREATE UNIQUE INDEX verifications_global_seq ON verifications (global_seq)
        WHERE global_seq IS NOT NULL;
    CREATE UNIQUE INDEX verifications_prefix_seq ON verifications (phone_prefix, prefix_seq)
        WHERE prefix_seq IS NOT NULL;
    DROP INDEX verifications_by_prefix;
    DROP INDEX verifications_by_time;
    """,
    # 9: API key scopes and failed checks per key (see SQLITE[8]).
    """
    ALTER TABLE api_keys ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin';
    CREATE TABLE check_failures (
        phone TEXT NOT NULL,
        api_key_id TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        failures INTEGER NOT NULL
    );
    CREATE INDEX check_failures_by_phone ON check_failures (phone, at);
    CREATE INDEX check_failures_by_time ON check_failures (at);
    INSERT INTO check_failures (phone, api_key_id, at, failures)
        SELECT phone, api_key_id, updated_at, failed_checks FROM verifications
        WHERE failed_checks > 0 AND updated_at > EXTRACT(EPOCH FROM now()) - 30 * 86400;
    """,
    # 10: many gateways on one database (see SQLITE[9]).
    """
    ALTER TABLE calls ADD COLUMN owner TEXT;
    ALTER TABLE calls ADD COLUMN node TEXT;
    CREATE INDEX calls_live_by_owner ON calls (owner)
        WHERE status IN ('queued', 'dialing', 'ringing');
    CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        incarnation TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        stopped_at DOUBLE PRECISION
    );
    """,
    # 11: a webhook event's snapshot (see SQLITE[10]).
    """
    ALTER TABLE webhook_outbox ADD COLUMN snapshot TEXT;
    """,
    # 12: a verification's steps, one call each (see SQLITE[11]).
    """
    ALTER TABLE verifications
        ADD COLUMN channels TEXT NOT NULL DEFAULT 'flashcall',
        ADD COLUMN locale TEXT,
        ADD COLUMN fallback_after DOUBLE PRECISION,
        ADD COLUMN step INTEGER NOT NULL DEFAULT 0,
        ADD COLUMN next_at DOUBLE PRECISION,
        ADD COLUMN next_asked_at DOUBLE PRECISION,
        ADD COLUMN code_sealed TEXT;
    CREATE INDEX verifications_next_due ON verifications (next_at) WHERE next_at IS NOT NULL;
    ALTER TABLE calls
        ADD COLUMN channel TEXT NOT NULL DEFAULT 'flashcall',
        ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE calls DROP CONSTRAINT calls_verification_id_key;
    ALTER TABLE calls ADD CONSTRAINT calls_verification_id_step_key UNIQUE (verification_id, step);
    CREATE TABLE voice_usage (
        api_key_id TEXT NOT NULL,
        minute INTEGER NOT NULL,
        calls INTEGER NOT NULL,
        PRIMARY KEY (api_key_id, minute)
    );
    """,
    # 13: a check's source and the call log watch (see SQLITE[12]).
    """
    ALTER TABLE verifications
        ADD COLUMN check_source TEXT,
        ADD COLUMN watch_seconds DOUBLE PRECISION;
    """,
    # 14: pool health, conversion counts and alerts (see SQLITE[13]).
    """
    CREATE TABLE pool_health (
        pool TEXT NOT NULL,
        carrier TEXT NOT NULL,
        state TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL,
        failures INTEGER NOT NULL,
        recent TEXT NOT NULL,
        held BOOLEAN NOT NULL,
        probe_at DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (carrier, pool)
    );
    CREATE TABLE conversion (
        block TEXT NOT NULL,
        minute INTEGER NOT NULL,
        carrier TEXT NOT NULL,
        region TEXT NOT NULL,
        created INTEGER NOT NULL,
        approved INTEGER NOT NULL,
        PRIMARY KEY (block, minute)
    );
    CREATE INDEX conversion_by_minute ON conversion (minute);
    CREATE TABLE alerts (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        created INTEGER NOT NULL,
        approved INTEGER NOT NULL,
        mode TEXT NOT NULL,
        raised_at DOUBLE PRECISION NOT NULL,
        blocked_until DOUBLE PRECISION,
        cleared_at DOUBLE PRECISION,
        cleared_by TEXT
    );
    CREATE UNIQUE INDEX alerts_open ON alerts (kind, target) WHERE cleared_at IS NULL;
    CREATE INDEX alerts_by_raised ON alerts (raised_at);
    """,
    # 15: calls_live (live calls by status) goes: calls_live_by_owner holds the same
    # rows, and every status change of a call moved its entry in both (make bench).
    """
    DROP INDEX calls_live;
    """,
    # 16: calls_by_end holds ended calls only: a call not yet ended had an entry at its
    # create that its end moved, two pages written more per call (make bench). The live
    # ones are calls_live_by_owner's.
    """
    DROP INDEX calls_by_end;
    CREATE INDEX calls_by_end ON calls (ended_at) WHERE ended_at IS NOT NULL;
    """,
)
