-- 0004: organization SSH certificate authorities, and the certificates they revoked.
--
-- An organization may register the public key of an OpenSSH user CA. A user certificate that
-- CA signed opens a sandbox of that organization when it is valid now, names the sandbox id
-- (or one of the CA's extra ``principals``) among its principals, and neither its key id nor
-- its serial is revoked for that CA. Like ssh_keys, every row carries org_id and every query
-- filters on it: a CA of one organization never opens another organization's sandbox.
--
-- Changes that can end live access notify like migration 0002 does, with kind
-- "cert_authority" and key_id = the CA's id (for a certificate login, the credential the
-- gateway tracks is the CA):
--   ssh_cert_authorities   revoked_at / org_id / fingerprint / public_key / principals changed;
--                          deleted
--   ssh_cert_revocations   inserted (a certificate revoked); deleted or updated (widening: the
--                          receiver re-checks and decides)

CREATE TABLE ssh_cert_authorities (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id           uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    algorithm        text NOT NULL,
    bits             integer NOT NULL CHECK (bits > 0),
    fingerprint      text NOT NULL CHECK (fingerprint ~ '^SHA256:[A-Za-z0-9+/]{43}$'),
    public_key       text NOT NULL,
    comment          text,
    -- Principals accepted besides the sandbox id itself (e.g. a team name the CA issues).
    principals       text[] NOT NULL DEFAULT '{}'
                     CHECK (cardinality(principals) <= 32),
    created_at       timestamptz NOT NULL DEFAULT now(),
    created_by       text CHECK (length(created_by) BETWEEN 1 AND 200),
    created_by_type  text CHECK (created_by_type IN ('member', 'api_key', 'cli')),
    revoked_at       timestamptz,
    CONSTRAINT ssh_cert_authorities_created_by_both
        CHECK ((created_by IS NULL) = (created_by_type IS NULL)),
    UNIQUE (org_id, id)
);
-- A CA key is registered at most once per organization among CAs not revoked.
CREATE UNIQUE INDEX ssh_cert_authorities_org_fingerprint
    ON ssh_cert_authorities (org_id, fingerprint) WHERE revoked_at IS NULL;
CREATE INDEX ssh_cert_authorities_org_active
    ON ssh_cert_authorities (org_id) WHERE revoked_at IS NULL;

CREATE TABLE ssh_cert_revocations (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id           uuid NOT NULL,
    ca_id            uuid NOT NULL,
    -- Exactly one of: the certificate's key id (ssh-keygen -I) or its serial (ssh-keygen -z).
    cert_key_id      text CHECK (length(cert_key_id) BETWEEN 1 AND 1024),
    serial           numeric(20, 0) CHECK (serial BETWEEN 0 AND 18446744073709551615),
    reason           text CHECK (length(reason) <= 500),
    created_at       timestamptz NOT NULL DEFAULT now(),
    created_by       text CHECK (length(created_by) BETWEEN 1 AND 200),
    created_by_type  text CHECK (created_by_type IN ('member', 'api_key', 'cli')),
    CONSTRAINT ssh_cert_revocations_one_of CHECK ((cert_key_id IS NULL) <> (serial IS NULL)),
    CONSTRAINT ssh_cert_revocations_created_by_both
        CHECK ((created_by IS NULL) = (created_by_type IS NULL)),
    -- The CA must belong to the revocation's organization.
    FOREIGN KEY (org_id, ca_id) REFERENCES ssh_cert_authorities (org_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX ssh_cert_revocations_key_id
    ON ssh_cert_revocations (org_id, ca_id, cert_key_id) WHERE cert_key_id IS NOT NULL;
CREATE UNIQUE INDEX ssh_cert_revocations_serial
    ON ssh_cert_revocations (org_id, ca_id, serial) WHERE serial IS NOT NULL;

CREATE FUNCTION rtgw_cert_authorities_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- Part of an organization's cascade: the organization's own notification covers it.
        IF NOT EXISTS (SELECT 1 FROM organizations WHERE id = OLD.org_id) THEN
            RETURN NULL;
        END IF;
        PERFORM rtgw_notify_access(jsonb_build_object(
            'kind', 'cert_authority', 'op', 'delete', 'org_id', OLD.org_id,
            'key_id', OLD.id, 'fingerprint', OLD.fingerprint));
        RETURN NULL;
    END IF;
    PERFORM rtgw_notify_access(jsonb_build_object(
        'kind', 'cert_authority', 'op', 'update', 'org_id', OLD.org_id,
        'key_id', OLD.id, 'fingerprint', OLD.fingerprint,
        'changed', to_jsonb(array_remove(ARRAY[
            CASE WHEN OLD.revoked_at IS DISTINCT FROM NEW.revoked_at THEN 'revoked_at' END,
            CASE WHEN OLD.org_id IS DISTINCT FROM NEW.org_id THEN 'org_id' END,
            CASE WHEN OLD.fingerprint IS DISTINCT FROM NEW.fingerprint THEN 'fingerprint' END,
            CASE WHEN OLD.public_key IS DISTINCT FROM NEW.public_key THEN 'public_key' END,
            CASE WHEN OLD.principals IS DISTINCT FROM NEW.principals THEN 'principals' END
        ], NULL))));
    RETURN NULL;
END
$$;

CREATE TRIGGER rtgw_cert_authorities_updated
    AFTER UPDATE ON ssh_cert_authorities
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.org_id IS DISTINCT FROM NEW.org_id
          OR OLD.fingerprint IS DISTINCT FROM NEW.fingerprint
          OR OLD.public_key IS DISTINCT FROM NEW.public_key
          OR OLD.principals IS DISTINCT FROM NEW.principals)
    EXECUTE FUNCTION rtgw_cert_authorities_changed();

CREATE TRIGGER rtgw_cert_authorities_deleted
    AFTER DELETE ON ssh_cert_authorities
    FOR EACH ROW EXECUTE FUNCTION rtgw_cert_authorities_changed();

CREATE FUNCTION rtgw_cert_revocations_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_ ssh_cert_revocations;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_ := OLD;
        IF NOT EXISTS (SELECT 1 FROM ssh_cert_authorities WHERE id = OLD.ca_id) THEN
            RETURN NULL;  -- cascaded from its CA: the CA's notification covers it
        END IF;
    ELSE
        row_ := NEW;
    END IF;
    PERFORM rtgw_notify_access(jsonb_build_object(
        'kind', 'cert_authority', 'op', 'update', 'org_id', row_.org_id,
        'key_id', row_.ca_id, 'changed', to_jsonb(ARRAY['revocations'])));
    RETURN NULL;
END
$$;

CREATE TRIGGER rtgw_cert_revocations_changed
    AFTER INSERT OR UPDATE OR DELETE ON ssh_cert_revocations
    FOR EACH ROW EXECUTE FUNCTION rtgw_cert_revocations_changed();

CREATE TRIGGER rtgw_cert_authorities_truncated
    AFTER TRUNCATE ON ssh_cert_authorities FOR EACH STATEMENT EXECUTE FUNCTION rtgw_truncated();
CREATE TRIGGER rtgw_cert_revocations_truncated
    AFTER TRUNCATE ON ssh_cert_revocations FOR EACH STATEMENT EXECUTE FUNCTION rtgw_truncated();
