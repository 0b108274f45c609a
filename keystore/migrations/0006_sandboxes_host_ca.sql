-- 0006: a sandbox may pin no host key and rely on the gateway's host CA alone
-- (upstream.host_ca_keys_file, known_hosts "@cert-authority" style).
--
-- keystore.sandboxes.add_sandbox still asks for at least one pin unless the caller says the
-- sandbox is trusted through the host CA (CLI: sandbox add --host-ca). A gateway without a
-- host CA refuses such a sandbox's host key, whatever it is: fail closed.

ALTER TABLE sandboxes DROP CONSTRAINT sandboxes_host_keys_check;
