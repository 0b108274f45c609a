"""Exceptions raised by keystore.

KeystoreError
 +-- Unavailable        the database cannot be reached or answered with a server error
 +-- NotFound           the named row does not exist *in the caller's organization*
 +-- Conflict           a uniqueness rule would be broken (e.g. a fingerprint already registered)
 +-- MemberRemoved      a member acting with a session token issued before their removal
 +-- InvalidInput       the caller's input is malformed; ``str(exc)`` is a message for a person
      +-- InvalidPublicKey
      +-- InvalidToken
      +-- InvalidChange    a payload on the access-change channel that is not one of ours
"""

from __future__ import annotations


class KeystoreError(Exception):
    """Base of every keystore error."""

    code = "keystore_error"


class Unavailable(KeystoreError):
    code = "database_unavailable"


class NotFound(KeystoreError):
    code = "not_found"


class Conflict(KeystoreError):
    code = "conflict"

    def __init__(self, message: str, existing_id: str | None = None) -> None:
        super().__init__(message)
        self.existing_id = existing_id


class MemberRemoved(KeystoreError):
    """The member was removed from the organization after their session token was issued."""

    code = "member_removed"


class InvalidInput(KeystoreError):
    code = "invalid_input"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidPublicKey(InvalidInput):
    code = "invalid_public_key"


class InvalidToken(InvalidInput):
    code = "invalid_token"


class InvalidChange(InvalidInput):
    code = "invalid_change"
