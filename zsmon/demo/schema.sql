-- The ZeroState platform's tables as zsmon reads them (see docs/invariants.md).
-- Used by the tests and the demo; zsmon itself never runs DDL against a monitored database.
-- gen_random_uuid() is built into PostgreSQL 13+: no pgcrypto needed (the embedded demo server ships no contrib).

CREATE TABLE IF NOT EXISTS accounts (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    did             TEXT NOT NULL UNIQUE,
    balance         DECIMAL(20,8) NOT NULL DEFAULT 0 CHECK (balance >= 0),
    total_deposited DECIMAL(20,8) NOT NULL DEFAULT 0,
    total_withdrawn DECIMAL(20,8) NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    metadata        JSONB NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE IF NOT EXISTS payment_channels (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    payer_did       TEXT NOT NULL,
    payee_did       TEXT NOT NULL,
    auction_id      TEXT,
    total_deposit   DECIMAL(20,8) NOT NULL DEFAULT 0,
    current_balance DECIMAL(20,8) NOT NULL DEFAULT 0,
    escrowed_amount DECIMAL(20,8) NOT NULL DEFAULT 0,
    total_settled   DECIMAL(20,8) NOT NULL DEFAULT 0,
    pending_refund  DECIMAL(20,8) NOT NULL DEFAULT 0,
    state           TEXT NOT NULL DEFAULT 'open'
                    CHECK (state IN ('open', 'escrowed', 'settling', 'closed')),
    task_id         TEXT,
    escrow_released BOOLEAN NOT NULL DEFAULT false,
    sequence_number BIGINT NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at       TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS idx_payment_channels_payer ON payment_channels (payer_did);
CREATE INDEX IF NOT EXISTS idx_payment_channels_payee ON payment_channels (payee_did);
CREATE INDEX IF NOT EXISTS idx_payment_channels_auction ON payment_channels (auction_id);
CREATE INDEX IF NOT EXISTS idx_payment_channels_updated ON payment_channels (updated_at);

CREATE TABLE IF NOT EXISTS channel_transactions (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    channel_id       UUID NOT NULL REFERENCES payment_channels (id),
    transaction_type TEXT NOT NULL,
    amount           DECIMAL(20,8) NOT NULL,
    task_id          TEXT,
    reason           TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    metadata         JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_channel_transactions_channel ON channel_transactions (channel_id);
CREATE INDEX IF NOT EXISTS idx_channel_transactions_created ON channel_transactions (created_at);

CREATE TABLE IF NOT EXISTS agents (
    did           TEXT PRIMARY KEY,
    name          TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL DEFAULT 'active',
    max_capacity  INTEGER NOT NULL DEFAULT 10,
    current_load  INTEGER NOT NULL DEFAULT 0,
    region        TEXT,
    last_seen_at  TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS tasks (
    task_id      TEXT PRIMARY KEY,
    user_did     TEXT NOT NULL,
    agent_did    TEXT,
    status       TEXT NOT NULL DEFAULT 'pending',
    timeout_at   TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS auctions (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    task_id          TEXT,
    user_id          TEXT,
    auction_type     TEXT NOT NULL DEFAULT 'first_price',
    status           TEXT NOT NULL DEFAULT 'open',
    duration_seconds INTEGER NOT NULL DEFAULT 30,
    expires_at       TIMESTAMPTZ NOT NULL,
    reserve_price    DECIMAL(20,8) NOT NULL DEFAULT 0,
    max_price        DECIMAL(20,8),
    min_reputation   DECIMAL(5,2) NOT NULL DEFAULT 0,
    capabilities     JSONB NOT NULL DEFAULT '[]'::jsonb,
    winning_bid_id   UUID,
    final_price      DECIMAL(20,8),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    metadata         JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_auctions_status ON auctions (status);
CREATE INDEX IF NOT EXISTS idx_auctions_updated ON auctions (updated_at);
CREATE INDEX IF NOT EXISTS idx_auctions_expires ON auctions (expires_at);

CREATE TABLE IF NOT EXISTS bids (
    id                     UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    auction_id             UUID NOT NULL REFERENCES auctions (id),
    agent_did              TEXT NOT NULL,
    price                  DECIMAL(20,8) NOT NULL,
    estimated_time_seconds INTEGER NOT NULL DEFAULT 0,
    reputation_score       DECIMAL(5,2) NOT NULL DEFAULT 50,
    quality_score          DECIMAL(5,2) NOT NULL DEFAULT 0,
    composite_score        DECIMAL(10,4) NOT NULL DEFAULT 0,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_bids_auction ON bids (auction_id);

CREATE TABLE IF NOT EXISTS reputation_scores (
    id                UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_did         TEXT NOT NULL UNIQUE,
    overall_score     DECIMAL(5,2) NOT NULL DEFAULT 50,
    reliability_score DECIMAL(5,2) NOT NULL DEFAULT 50,
    quality_score     DECIMAL(5,2) NOT NULL DEFAULT 50,
    speed_score       DECIMAL(5,2) NOT NULL DEFAULT 50,
    total_tasks       INTEGER NOT NULL DEFAULT 0,
    successful_tasks  INTEGER NOT NULL DEFAULT 0,
    failed_tasks      INTEGER NOT NULL DEFAULT 0,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS reputation_events (
    id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_did   TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    task_id     TEXT,
    score_delta DECIMAL(5,2) NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    metadata    JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_reputation_events_agent ON reputation_events (agent_did, created_at);

CREATE TABLE IF NOT EXISTS audit_logs (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       TEXT,
    action        TEXT NOT NULL,
    resource_type TEXT,
    resource_id   TEXT,
    status_code   INTEGER,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_audit_logs_created ON audit_logs (created_at);
