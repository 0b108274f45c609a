-- 0003: members signed in through WorkOS (issue 13).
--
--   organizations.workos_org_id   the WorkOS organization a session token's org_id names
--   organizations.disabled_at     set when WorkOS deletes the organization: its SSH keys and
--                                 API keys are refused and its live sessions end (NOTIFY below)
--   ssh_keys / api_keys           who registered the key: created_by_type member | api_key | cli
--                                 with created_by the member's user id, the API key's id or
--                                 'cli' (api_keys keeps its created_by uuid for API keys and
--                                 adds created_by_member for members)
--   workos_member_removals        a member removed from an organization: session tokens issued
--                                 before removed_at are refused
--   workos_events                 every webhook event, recorded before it is acknowledged and
--                                 processed once (processed_at)
--
-- Access changes: disabling (or re-enabling) an organization notifies 'rtgw_access' like a
-- delete does, with kind "org" and op "update"; the receiver re-checks the organization's live
-- grants (keystore/access.py reports "org_disabled"). Revoking a member's keys is an UPDATE of
-- ssh_keys.revoked_at: the 0002 trigger notifies each key as before.

ALTER TABLE organizations
    ADD COLUMN workos_org_id text UNIQUE
        CHECK (workos_org_id ~ '^[A-Za-z][A-Za-z0-9_-]{0,127}$'),
    ADD COLUMN disabled_at timestamptz;

ALTER TABLE ssh_keys
    ADD COLUMN created_by text CHECK (length(created_by) BETWEEN 1 AND 200),
    ADD COLUMN created_by_type text CHECK (created_by_type IN ('member', 'api_key', 'cli')),
    ADD CONSTRAINT ssh_keys_created_by_both
        CHECK ((created_by IS NULL) = (created_by_type IS NULL));
-- The keys a removed member registered, found without scanning the organization's keys.
CREATE INDEX ssh_keys_org_member ON ssh_keys (org_id, created_by)
    WHERE created_by_type = 'member' AND revoked_at IS NULL;

ALTER TABLE api_keys
    ADD COLUMN created_by_type text CHECK (created_by_type IN ('member', 'api_key', 'cli')),
    ADD COLUMN created_by_member text CHECK (length(created_by_member) BETWEEN 1 AND 200),
    ADD CONSTRAINT api_keys_created_by_member
        CHECK ((created_by_type = 'member') = (created_by_member IS NOT NULL));
UPDATE api_keys SET created_by_type = 'api_key' WHERE created_by IS NOT NULL;

CREATE TABLE workos_member_removals (
    org_id      uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    user_id     text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    removed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);

CREATE TABLE workos_events (
    id            text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 200),
    event         text NOT NULL CHECK (length(event) BETWEEN 1 AND 200),
    payload       jsonb NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz,
    outcome       text,
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text
);
CREATE INDEX workos_events_pending ON workos_events (received_at) WHERE processed_at IS NULL;

CREATE FUNCTION rtgw_organizations_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rtgw_notify_access(jsonb_build_object(
        'kind', 'org', 'op', 'update', 'org_id', OLD.id,
        'changed', to_jsonb(ARRAY['disabled_at'])));
    RETURN NULL;
END
$$;

CREATE TRIGGER rtgw_organizations_disabled
    AFTER UPDATE ON organizations
    FOR EACH ROW
    WHEN (OLD.disabled_at IS DISTINCT FROM NEW.disabled_at)
    EXECUTE FUNCTION rtgw_organizations_updated();
