-- 0002: tell every gateway process when access may have shrunk, whoever wrote the change.
--
-- Row triggers raise pg_notify('rtgw_access', payload) on the changes that can end live access:
--   ssh_keys       revoked_at / expires_at / org_id / fingerprint / public_key changed; deleted
--   sandboxes      status / org_id / upstream_host / upstream_port / login_user / host_keys
--                  changed; deleted
--   organizations  deleted
--   any of them    truncated (payload kind "all": re-check everything)
-- The payload is a small JSON object (well under the 8000-byte NOTIFY limit):
--   {"kind": "ssh_key"|"sandbox"|"org"|"all", "op": "update"|"delete"|"truncate",
--    "org_id": uuid (absent for "all"), "sandbox_id"?: text, "key_id"?: uuid, "fingerprint"?: text,
--    "changed"?: [column, ...], "at": clock_timestamp() as epoch seconds}
-- Notifications are delivered when (and only if) the writing transaction commits.
-- When an organization is deleted, the cascaded deletes of its keys and sandboxes notify
-- nothing: the one "org" notification covers them.
-- Widening changes (un-revoking, extending expires_at) notify too, so a listener can
-- reschedule an expiry; the receiver re-checks the database and decides.

CREATE FUNCTION rtgw_notify_access(payload jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'rtgw_access',
        jsonb_strip_nulls(payload || jsonb_build_object('at', extract(epoch FROM clock_timestamp())))::text
    );
END
$$;

-- One trigger function per table for UPDATE and DELETE; the UPDATE triggers carry a WHEN clause
-- on the watched columns, so writes that cannot change access (last_used_at on every login,
-- updated_at) never even call the function.

CREATE FUNCTION rtgw_ssh_keys_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- Part of an organization's cascade: the organization's own notification covers it.
        IF NOT EXISTS (SELECT 1 FROM organizations WHERE id = OLD.org_id) THEN
            RETURN NULL;
        END IF;
        PERFORM rtgw_notify_access(jsonb_build_object(
            'kind', 'ssh_key', 'op', 'delete', 'org_id', OLD.org_id,
            'key_id', OLD.id, 'fingerprint', OLD.fingerprint));
        RETURN NULL;
    END IF;
    -- The organization that may lose access is the old one (it matters when org_id changed).
    PERFORM rtgw_notify_access(jsonb_build_object(
        'kind', 'ssh_key', 'op', 'update', 'org_id', OLD.org_id,
        'key_id', OLD.id, 'fingerprint', OLD.fingerprint,
        'changed', to_jsonb(array_remove(ARRAY[
            CASE WHEN OLD.revoked_at IS DISTINCT FROM NEW.revoked_at THEN 'revoked_at' END,
            CASE WHEN OLD.expires_at IS DISTINCT FROM NEW.expires_at THEN 'expires_at' END,
            CASE WHEN OLD.org_id IS DISTINCT FROM NEW.org_id THEN 'org_id' END,
            CASE WHEN OLD.fingerprint IS DISTINCT FROM NEW.fingerprint THEN 'fingerprint' END,
            CASE WHEN OLD.public_key IS DISTINCT FROM NEW.public_key THEN 'public_key' END
        ], NULL))));
    RETURN NULL;
END
$$;

CREATE TRIGGER rtgw_ssh_keys_updated
    AFTER UPDATE ON ssh_keys
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.org_id IS DISTINCT FROM NEW.org_id
          OR OLD.fingerprint IS DISTINCT FROM NEW.fingerprint
          OR OLD.public_key IS DISTINCT FROM NEW.public_key)
    EXECUTE FUNCTION rtgw_ssh_keys_changed();

CREATE TRIGGER rtgw_ssh_keys_deleted
    AFTER DELETE ON ssh_keys
    FOR EACH ROW EXECUTE FUNCTION rtgw_ssh_keys_changed();

CREATE FUNCTION rtgw_sandboxes_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF NOT EXISTS (SELECT 1 FROM organizations WHERE id = OLD.org_id) THEN
            RETURN NULL;
        END IF;
        PERFORM rtgw_notify_access(jsonb_build_object(
            'kind', 'sandbox', 'op', 'delete', 'org_id', OLD.org_id, 'sandbox_id', OLD.id));
        RETURN NULL;
    END IF;
    PERFORM rtgw_notify_access(jsonb_build_object(
        'kind', 'sandbox', 'op', 'update', 'org_id', OLD.org_id, 'sandbox_id', OLD.id,
        'changed', to_jsonb(array_remove(ARRAY[
            CASE WHEN OLD.status IS DISTINCT FROM NEW.status THEN 'status' END,
            CASE WHEN OLD.org_id IS DISTINCT FROM NEW.org_id THEN 'org_id' END,
            CASE WHEN OLD.upstream_host IS DISTINCT FROM NEW.upstream_host
                 THEN 'upstream_host' END,
            CASE WHEN OLD.upstream_port IS DISTINCT FROM NEW.upstream_port
                 THEN 'upstream_port' END,
            CASE WHEN OLD.login_user IS DISTINCT FROM NEW.login_user THEN 'login_user' END,
            CASE WHEN OLD.host_keys IS DISTINCT FROM NEW.host_keys THEN 'host_keys' END
        ], NULL))));
    RETURN NULL;
END
$$;

CREATE TRIGGER rtgw_sandboxes_updated
    AFTER UPDATE ON sandboxes
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.org_id IS DISTINCT FROM NEW.org_id
          OR OLD.upstream_host IS DISTINCT FROM NEW.upstream_host
          OR OLD.upstream_port IS DISTINCT FROM NEW.upstream_port
          OR OLD.login_user IS DISTINCT FROM NEW.login_user
          OR OLD.host_keys IS DISTINCT FROM NEW.host_keys)
    EXECUTE FUNCTION rtgw_sandboxes_changed();

CREATE TRIGGER rtgw_sandboxes_deleted
    AFTER DELETE ON sandboxes
    FOR EACH ROW EXECUTE FUNCTION rtgw_sandboxes_changed();

CREATE FUNCTION rtgw_organizations_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rtgw_notify_access(jsonb_build_object('kind', 'org', 'op', 'delete', 'org_id', OLD.id));
    RETURN NULL;
END
$$;

CREATE TRIGGER rtgw_organizations_access
    AFTER DELETE ON organizations
    FOR EACH ROW EXECUTE FUNCTION rtgw_organizations_changed();

CREATE FUNCTION rtgw_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rtgw_notify_access(jsonb_build_object('kind', 'all', 'op', 'truncate'));
    RETURN NULL;
END
$$;

CREATE TRIGGER rtgw_ssh_keys_truncated
    AFTER TRUNCATE ON ssh_keys FOR EACH STATEMENT EXECUTE FUNCTION rtgw_truncated();
CREATE TRIGGER rtgw_sandboxes_truncated
    AFTER TRUNCATE ON sandboxes FOR EACH STATEMENT EXECUTE FUNCTION rtgw_truncated();
CREATE TRIGGER rtgw_organizations_truncated
    AFTER TRUNCATE ON organizations FOR EACH STATEMENT EXECUTE FUNCTION rtgw_truncated();
