"""Connection credentials, sealed by the application: AES-256-GCM with key ids.

- Keys come from the environment only (``CREDENTIAL_KEYS`` = ``"<key_id>:<base64 32 bytes>,..."``);
  the first key seals, every listed key opens, so a new key can be put first and the old ones kept
  until ``python -m shared.connections.rotate`` has re-sealed every row under the new one.
- Each ciphertext is stored with the id of the key that sealed it and a fresh 96-bit random nonce.
- The organization id and the connection id are bound as associated data: a ciphertext copied onto
  another connection (or another tenant's) fails authentication instead of decrypting.

Nothing here talks to the database; `shared.connections.service` reads the sealed rows from the
``secrets`` schema, which only the service role can read, so opening only happens on that path.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Final

from shared.settings import get_settings

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES: Final = 32  # AES-256
NONCE_BYTES: Final = 12  # the GCM standard nonce; random per seal
_AAD_PREFIX: Final = b"hiredhands/connection-credential/v1|"
_KEY_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class CredentialKeyError(ValueError):
    """CREDENTIAL_KEYS is missing or malformed. The message never contains key material."""


class CredentialUnreadable(Exception):
    """A sealed credential could not be opened: unknown key id, wrong binding, or tampering."""


@dataclass(frozen=True, slots=True)
class Sealed:
    key_id: str
    nonce: bytes
    ciphertext: bytes  # includes the 16-byte GCM tag

    def __repr__(self) -> str:  # no bytes in reprs, even encrypted ones
        return f"Sealed(key_id={self.key_id!r}, ciphertext_bytes={len(self.ciphertext)})"


def associated_data(*, org_id: uuid.UUID, connection_id: uuid.UUID) -> bytes:
    return _AAD_PREFIX + org_id.bytes + connection_id.bytes


class Keyring:
    """The credential keys, current first. Build with `parse_keys` or `get_keyring()`."""

    __slots__ = ("_ciphers", "_current")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        # cryptography loads with the first keyring, not when a function starts (~7 ms of a cold start
        # that most requests, which open no credential, would pay).
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not keys:
            raise CredentialKeyError("CREDENTIAL_KEYS holds no key")
        ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if not _KEY_ID.match(key_id):
                raise CredentialKeyError("credential key ids are 1-32 characters of letters, digits, '-' and '_'")
            if key_id in ciphers:
                raise CredentialKeyError(f"credential key id {key_id!r} is listed twice")
            if len(key) != KEY_BYTES:
                raise CredentialKeyError(f"credential key {key_id!r} must be {KEY_BYTES} bytes (base64 encoded)")
            ciphers[key_id] = AESGCM(key)
        self._ciphers = ciphers
        self._current = keys[0][0]

    def __repr__(self) -> str:
        return f"Keyring(current={self._current!r}, key_ids={list(self._ciphers)!r})"

    @property
    def current_key_id(self) -> str:
        return self._current

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._ciphers)

    def seal(self, plaintext: bytes, *, org_id: uuid.UUID, connection_id: uuid.UUID) -> Sealed:
        nonce = os.urandom(NONCE_BYTES)
        aad = associated_data(org_id=org_id, connection_id=connection_id)
        ciphertext = self._ciphers[self._current].encrypt(nonce, plaintext, aad)
        return Sealed(key_id=self._current, nonce=nonce, ciphertext=ciphertext)

    def open(self, sealed: Sealed, *, org_id: uuid.UUID, connection_id: uuid.UUID) -> bytes:
        from cryptography.exceptions import InvalidTag  # loaded with the keyring already

        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise CredentialUnreadable(f"no credential key with id {sealed.key_id!r} is configured")
        if len(sealed.nonce) != NONCE_BYTES:
            raise CredentialUnreadable("the stored nonce has the wrong length")
        try:
            return cipher.decrypt(
                sealed.nonce, sealed.ciphertext, associated_data(org_id=org_id, connection_id=connection_id)
            )
        except InvalidTag:
            raise CredentialUnreadable(
                "the credential failed authentication (wrong key, wrong connection, or altered)"
            ) from None

    def reseal(self, sealed: Sealed, *, org_id: uuid.UUID, connection_id: uuid.UUID) -> Sealed | None:
        """The credential sealed under the current key, or None when it already is."""
        if sealed.key_id == self._current:
            return None
        return self.seal(
            self.open(sealed, org_id=org_id, connection_id=connection_id), org_id=org_id, connection_id=connection_id
        )


def parse_keys(value: str) -> Keyring:
    """``"k2:<base64>,k1:<base64>"`` -> a Keyring sealing with k2 and opening both."""
    keys: list[tuple[str, bytes]] = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry:
            continue
        key_id, sep, encoded = entry.partition(":")
        if not sep:
            raise CredentialKeyError("each CREDENTIAL_KEYS entry is '<key_id>:<base64 key>'")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise CredentialKeyError(f"credential key {key_id.strip()!r} is not valid base64") from None
        keys.append((key_id.strip(), key))
    return Keyring(keys)


@lru_cache(maxsize=4)
def _keyring_for(value: str) -> Keyring:
    return parse_keys(value)


def get_keyring() -> Keyring:
    """The keyring of the current settings (parsed once per distinct value)."""
    return _keyring_for(get_settings().credential_keys.get_secret_value())


def generate_key() -> str:
    """A new random key, base64 encoded, for an operator to add to CREDENTIAL_KEYS."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")
