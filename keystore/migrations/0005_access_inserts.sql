-- 0005: notify on inserts that widen access too (a key or a CA registered).
--
-- Migrations 0002 and 0004 notify on changes that can end live access. A gateway that answers
-- repeat logins from memory (gateway/ssh/access.py CachedAccess) must also hear of a key or CA
-- just registered, or a user who registers a key and connects at once would be refused until
-- the cached entry ages out. Payload as in 0002, op "insert":
--   {"kind": "ssh_key"|"cert_authority", "op": "insert", "org_id": uuid, "key_id": uuid,
--    "fingerprint": text, "at": epoch seconds}
-- Inserting a sandbox notifies nothing: an unknown sandbox is never cached.

CREATE FUNCTION rtgw_credential_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rtgw_notify_access(jsonb_build_object(
        'kind', TG_ARGV[0], 'op', 'insert', 'org_id', NEW.org_id,
        'key_id', NEW.id, 'fingerprint', NEW.fingerprint));
    RETURN NULL;
END
$$;

CREATE TRIGGER rtgw_ssh_keys_inserted
    AFTER INSERT ON ssh_keys
    FOR EACH ROW EXECUTE FUNCTION rtgw_credential_inserted('ssh_key');

CREATE TRIGGER rtgw_cert_authorities_inserted
    AFTER INSERT ON ssh_cert_authorities
    FOR EACH ROW EXECUTE FUNCTION rtgw_credential_inserted('cert_authority');
