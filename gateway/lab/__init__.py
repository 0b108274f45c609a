"""The lab: the whole product on one machine, for the demo, the tests and the bench.

* ``postgres``: a throwaway PostgreSQL cluster (``initdb`` in a temp dir, trust auth,
  ``fsync=off``), gone on ``stop()``;
* ``sandbox_sshd``: a real OpenSSH ``sshd`` on loopback standing in for a sandbox (as root it
  creates the ``rtsandbox`` login user with ``useradd``);
* ``seed``: an organization with a sandbox pointing at an sshd and public keys registered;
* ``process``: the gateway as a subprocess (``python -m gateway serve``);
* ``user_keys``: key pairs made with ``ssh-keygen``;
* ``demo``: ``runtools-gateway demo``, all of the above in one command.

Not in the wheel. The ``[tool.setuptools]`` package list in ``pyproject.toml`` leaves this
package out on purpose:

* nothing here belongs on a production host: it runs ``useradd``/``usermod`` as root, starts a
  PostgreSQL that trusts every local connection and runs with ``fsync=off``, and starts extra
  ``sshd`` processes. Shipping it would put that one typo away from a server;
* the daemon never needs it (a unit test walks the daemon's import graph and asserts that no
  ``gateway.lab`` module is reachable; ``gateway.cli`` imports it lazily, in ``cmd_demo`` only);
* its users all work from a source checkout: the tests and the bench live there, and
  ``scripts/demo`` bootstraps an editable install (``pip install -e``), whose import hook maps
  the top-level ``gateway`` package to the checkout, so ``gateway.lab`` imports from there.

``runtools-gateway demo`` from an installed wheel therefore prints one line saying the demo runs
from a source checkout with ``bash scripts/demo``, and exits 1.
"""
