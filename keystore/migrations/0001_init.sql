-- 0001: organizations, projects, sandboxes, ssh keys, api keys, audit events.
-- Every tenant-owned row carries org_id, and every query in keystore/ filters on it.

CREATE TABLE organizations (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug        text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id      uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    slug        text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    is_default  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, slug),
    UNIQUE (org_id, id)
);
-- Exactly one default project per organization.
CREATE UNIQUE INDEX projects_one_default ON projects (org_id) WHERE is_default;

CREATE TABLE sandboxes (
    id             text PRIMARY KEY CHECK (id ~ '^sandbox-[a-z0-9-]{1,63}$'),
    org_id         uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    project_id     uuid NOT NULL,
    status         text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'stopped')),
    upstream_host  text NOT NULL CHECK (length(upstream_host) BETWEEN 1 AND 253),
    upstream_port  integer NOT NULL CHECK (upstream_port BETWEEN 1 AND 65535),
    login_user     text NOT NULL CHECK (login_user ~ '^[a-z_][a-z0-9_.-]{0,31}$'),
    -- Pinned upstream host keys, canonical "TYPE BASE64" lines; at least one.
    host_keys      text[] NOT NULL CHECK (cardinality(host_keys) >= 1),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- A sandbox's project must belong to the sandbox's organization.
    FOREIGN KEY (org_id, project_id) REFERENCES projects (org_id, id)
);
CREATE INDEX sandboxes_org ON sandboxes (org_id);

CREATE TABLE ssh_keys (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id        uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    project_id    uuid NOT NULL,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    algorithm     text NOT NULL,
    bits          integer NOT NULL CHECK (bits > 0),
    fingerprint   text NOT NULL CHECK (fingerprint ~ '^SHA256:[A-Za-z0-9+/]{43}$'),
    public_key    text NOT NULL,
    comment       text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    expires_at    timestamptz,
    FOREIGN KEY (org_id, project_id) REFERENCES projects (org_id, id)
);
-- A fingerprint is registered at most once per organization among keys not revoked;
-- a revoked key may be registered again.
CREATE UNIQUE INDEX ssh_keys_org_fingerprint ON ssh_keys (org_id, fingerprint)
    WHERE revoked_at IS NULL;
CREATE INDEX ssh_keys_org_active ON ssh_keys (org_id) WHERE revoked_at IS NULL;

CREATE TABLE api_keys (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id        uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    environment   text NOT NULL CHECK (environment IN ('live', 'test')),
    lookup        text NOT NULL UNIQUE CHECK (lookup ~ '^[0-9A-Za-z]{12}$'),
    -- sha256 of the whole secret; the secret itself is never stored.
    token_hash    bytea NOT NULL CHECK (length(token_hash) = 32),
    scopes        text[] NOT NULL CHECK (cardinality(scopes) >= 1),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    created_by    uuid REFERENCES api_keys(id) ON DELETE SET NULL
);
CREATE INDEX api_keys_org ON api_keys (org_id);

CREATE TABLE audit_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    org_id       uuid REFERENCES organizations(id) ON DELETE SET NULL,
    action       text NOT NULL,
    result       text NOT NULL,
    reason       text,
    actor        text,
    target       text,
    source_ip    inet,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_events_org_time ON audit_events (org_id, occurred_at DESC);
CREATE INDEX audit_events_time ON audit_events (occurred_at DESC);
