-- The ZeroState platform's tables in the shape its startup migrations create (see docs/invariants.md,
-- "What the deployed platform really writes"): VARCHAR text columns, nullable timestamps and metadata,
-- no CHECK or default on a channel's state, nullable bid scores, reserve and minimum reputation,
-- UUID `id` keys beside agents' `did` and tasks' `task_id`, cascading foreign keys, triggers that keep
-- `updated_at` current, and the platform's own indexes only (none on payment_channels.updated_at or
-- auctions.updated_at). zsmon's tests, demo and benchmarks all run on this one file; zsmon itself never
-- runs DDL against a monitored database.
-- gen_random_uuid() is built into PostgreSQL 13+ (the platform uses uuid-ossp's uuid_generate_v4(), which
-- the embedded demo server does not ship): the keys are the same type either way.

CREATE TABLE IF NOT EXISTS schema_migrations (
    id          SERIAL PRIMARY KEY,
    version     INT NOT NULL UNIQUE,
    description VARCHAR(255) NOT NULL,
    applied_at  TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    did           VARCHAR(255) NOT NULL UNIQUE,
    email         VARCHAR(255) UNIQUE,
    password_hash VARCHAR(255),
    created_at    TIMESTAMPTZ DEFAULT now(),
    updated_at    TIMESTAMPTZ DEFAULT now(),
    last_login_at TIMESTAMPTZ,
    is_active     BOOLEAN DEFAULT true,
    metadata      JSONB DEFAULT '{}'::jsonb
);

CREATE TABLE IF NOT EXISTS refresh_tokens (
    id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash VARCHAR(255) NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ DEFAULT now(),
    revoked_at TIMESTAMPTZ,
    ip_address INET,
    user_agent TEXT
);
CREATE INDEX IF NOT EXISTS idx_refresh_tokens_user ON refresh_tokens (user_id);

CREATE TABLE IF NOT EXISTS api_keys (
    id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_hash     VARCHAR(255) NOT NULL,
    key_prefix   VARCHAR(20) NOT NULL,
    name         VARCHAR(255),
    scopes       JSONB DEFAULT '[]'::jsonb,
    created_at   TIMESTAMPTZ DEFAULT now(),
    expires_at   TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ,
    is_active    BOOLEAN DEFAULT true
);
CREATE INDEX IF NOT EXISTS idx_api_keys_user ON api_keys (user_id);

CREATE TABLE IF NOT EXISTS accounts (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    did             VARCHAR(255) NOT NULL UNIQUE,
    balance         DECIMAL(20,8) NOT NULL DEFAULT 0 CHECK (balance >= 0),
    total_deposited DECIMAL(20,8) NOT NULL DEFAULT 0,
    total_withdrawn DECIMAL(20,8) NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ DEFAULT now(),
    updated_at      TIMESTAMPTZ DEFAULT now(),
    metadata        JSONB DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_accounts_balance ON accounts (balance);

-- No CHECK and no default on state, escrow_released nullable: the platform's own shape.
CREATE TABLE IF NOT EXISTS payment_channels (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    payer_did       VARCHAR(255) NOT NULL,
    payee_did       VARCHAR(255) NOT NULL,
    auction_id      VARCHAR(255),
    total_deposit   DECIMAL(20,8) NOT NULL,
    current_balance DECIMAL(20,8) NOT NULL,
    escrowed_amount DECIMAL(20,8) NOT NULL DEFAULT 0,
    total_settled   DECIMAL(20,8) NOT NULL DEFAULT 0,
    pending_refund  DECIMAL(20,8) NOT NULL DEFAULT 0,
    state           VARCHAR(50) NOT NULL,
    task_id         VARCHAR(255),
    escrow_released BOOLEAN DEFAULT false,
    sequence_number BIGINT NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ DEFAULT now(),
    updated_at      TIMESTAMPTZ DEFAULT now(),
    closed_at       TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS idx_channels_payer ON payment_channels (payer_did);
CREATE INDEX IF NOT EXISTS idx_channels_payee ON payment_channels (payee_did);
CREATE INDEX IF NOT EXISTS idx_channels_auction ON payment_channels (auction_id);
CREATE INDEX IF NOT EXISTS idx_channels_task ON payment_channels (task_id);
CREATE INDEX IF NOT EXISTS idx_channels_state ON payment_channels (state);

CREATE TABLE IF NOT EXISTS channel_transactions (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    channel_id       UUID NOT NULL REFERENCES payment_channels (id) ON DELETE CASCADE,
    transaction_type VARCHAR(50) NOT NULL,
    amount           DECIMAL(20,8) NOT NULL,
    task_id          VARCHAR(255),
    reason           TEXT,
    created_at       TIMESTAMPTZ DEFAULT now(),
    metadata         JSONB DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_channel_txs_channel ON channel_transactions (channel_id);
CREATE INDEX IF NOT EXISTS idx_channel_txs_type ON channel_transactions (transaction_type);
CREATE INDEX IF NOT EXISTS idx_channel_txs_created ON channel_transactions (created_at);

CREATE TABLE IF NOT EXISTS agents (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    did           TEXT NOT NULL UNIQUE,
    name          VARCHAR(255) NOT NULL,
    description   TEXT,
    capabilities  JSONB NOT NULL DEFAULT '[]'::jsonb,
    pricing_model TEXT,
    status        TEXT DEFAULT 'online',
    max_capacity  INT DEFAULT 10,
    current_load  INT DEFAULT 0,
    region        TEXT,
    created_at    TIMESTAMPTZ DEFAULT now(),
    updated_at    TIMESTAMPTZ DEFAULT now(),
    last_seen_at  TIMESTAMPTZ,
    metadata      JSONB DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_agents_status ON agents (status);
CREATE INDEX IF NOT EXISTS idx_agents_region ON agents (region);

-- reserve_price and min_reputation: nullable, no default (NULL means "not set").
CREATE TABLE IF NOT EXISTS auctions (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    task_id          VARCHAR(255) NOT NULL,
    user_id          VARCHAR(255) NOT NULL,
    auction_type     VARCHAR(50) NOT NULL,
    status           VARCHAR(50) NOT NULL,
    duration_seconds INT NOT NULL,
    expires_at       TIMESTAMPTZ NOT NULL,
    reserve_price    DECIMAL(20,8),
    max_price        DECIMAL(20,8),
    min_reputation   DECIMAL(5,2),
    capabilities     JSONB NOT NULL DEFAULT '[]'::jsonb,
    winning_bid_id   UUID,
    final_price      DECIMAL(20,8),
    created_at       TIMESTAMPTZ DEFAULT now(),
    updated_at       TIMESTAMPTZ DEFAULT now(),
    metadata         JSONB DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_auctions_task ON auctions (task_id);
CREATE INDEX IF NOT EXISTS idx_auctions_user ON auctions (user_id);
CREATE INDEX IF NOT EXISTS idx_auctions_status ON auctions (status);
CREATE INDEX IF NOT EXISTS idx_auctions_expires ON auctions (expires_at);

-- The scores the platform computed at bid time: nullable, no default; composite_score NUMERIC(10,6).
CREATE TABLE IF NOT EXISTS bids (
    id                     UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    auction_id             UUID NOT NULL REFERENCES auctions (id) ON DELETE CASCADE,
    agent_did              VARCHAR(255) NOT NULL,
    price                  DECIMAL(20,8) NOT NULL,
    estimated_time_seconds INT,
    reputation_score       DECIMAL(5,2),
    quality_score          DECIMAL(5,2),
    composite_score        DECIMAL(10,6),
    created_at             TIMESTAMPTZ DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_bids_auction ON bids (auction_id);
CREATE INDEX IF NOT EXISTS idx_bids_agent ON bids (agent_did);
CREATE INDEX IF NOT EXISTS idx_bids_composite ON bids (composite_score DESC);

CREATE TABLE IF NOT EXISTS reputation_scores (
    id                UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_did         VARCHAR(255) NOT NULL UNIQUE,
    overall_score     DECIMAL(5,2) NOT NULL DEFAULT 50.0,
    reliability_score DECIMAL(5,2) NOT NULL DEFAULT 50.0,
    quality_score     DECIMAL(5,2) NOT NULL DEFAULT 50.0,
    speed_score       DECIMAL(5,2) NOT NULL DEFAULT 50.0,
    total_tasks       INT NOT NULL DEFAULT 0,
    successful_tasks  INT NOT NULL DEFAULT 0,
    failed_tasks      INT NOT NULL DEFAULT 0,
    created_at        TIMESTAMPTZ DEFAULT now(),
    updated_at        TIMESTAMPTZ DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_reputation_overall ON reputation_scores (overall_score DESC);

-- Indexed on agent_did alone; score_delta nullable.
CREATE TABLE IF NOT EXISTS reputation_events (
    id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_did   VARCHAR(255) NOT NULL,
    event_type  VARCHAR(50) NOT NULL,
    task_id     VARCHAR(255),
    score_delta DECIMAL(5,2),
    created_at  TIMESTAMPTZ DEFAULT now(),
    metadata    JSONB DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_reputation_events_agent ON reputation_events (agent_did);
CREATE INDEX IF NOT EXISTS idx_reputation_events_type ON reputation_events (event_type);
CREATE INDEX IF NOT EXISTS idx_reputation_events_created ON reputation_events (created_at DESC);

CREATE TABLE IF NOT EXISTS tasks (
    id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    task_id      VARCHAR(255) NOT NULL UNIQUE,
    user_did     VARCHAR(255) NOT NULL,
    agent_did    VARCHAR(255),
    task_type    VARCHAR(100) NOT NULL,
    status       VARCHAR(50) NOT NULL,
    input        JSONB NOT NULL,
    output       JSONB,
    error        TEXT,
    created_at   TIMESTAMPTZ DEFAULT now(),
    started_at   TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    timeout_at   TIMESTAMPTZ,
    metadata     JSONB DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_tasks_user ON tasks (user_did);
CREATE INDEX IF NOT EXISTS idx_tasks_agent ON tasks (agent_did);
CREATE INDEX IF NOT EXISTS idx_tasks_status ON tasks (status);
CREATE INDEX IF NOT EXISTS idx_tasks_created ON tasks (created_at DESC);

CREATE TABLE IF NOT EXISTS audit_logs (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       UUID,
    action        VARCHAR(100) NOT NULL,
    resource_type VARCHAR(100),
    resource_id   VARCHAR(255),
    ip_address    INET,
    user_agent    TEXT,
    request_id    VARCHAR(255),
    status_code   INT,
    error         TEXT,
    created_at    TIMESTAMPTZ DEFAULT now(),
    metadata      JSONB DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_audit_action ON audit_logs (action);
CREATE INDEX IF NOT EXISTS idx_audit_resource ON audit_logs (resource_type, resource_id);
CREATE INDEX IF NOT EXISTS idx_audit_created ON audit_logs (created_at DESC);

CREATE TABLE IF NOT EXISTS rate_limit_buckets (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    key              VARCHAR(255) NOT NULL,
    endpoint         VARCHAR(255) NOT NULL,
    tokens_remaining INT NOT NULL,
    window_start     TIMESTAMPTZ NOT NULL,
    window_end       TIMESTAMPTZ NOT NULL,
    created_at       TIMESTAMPTZ DEFAULT now(),
    updated_at       TIMESTAMPTZ DEFAULT now(),
    UNIQUE (key, endpoint, window_start)
);

-- updated_at follows every UPDATE of the main tables, as the platform's triggers do. One difference, for
-- the tests' worlds that replay history at past times: an UPDATE that sets updated_at to a new value itself
-- keeps it (the platform's own writes set it to now() or not at all, so for them the two are the same).
CREATE OR REPLACE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'accounts', 'payment_channels', 'agents', 'auctions', 'reputation_scores']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'touch_' || t || '_updated_at') THEN
            EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON %I FOR EACH ROW EXECUTE FUNCTION touch_updated_at()',
                           'touch_' || t || '_updated_at', t);
        END IF;
    END LOOP;
END
$$;
