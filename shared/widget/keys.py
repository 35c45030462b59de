"""Widget keys: public, unguessable, stored only as a SHA-256 hash.

A key is ``hh_wk_`` + 48 hex characters (192 bits from the database's CSPRNG, issued by
``public.rotate_widget_key``). It sits in the customer's page source, so it is an address, not a
secret: the per-agent rate limit and the organization's budget are what bound its use.

Lookup is the same work for every key: hash it, then one lookup on the unique index of
``agents.widget_key_hash`` that also requires ``widget_enabled``. An unknown key, a rotated-out key
(its hash is gone from the table) and a disabled widget all come back as no row, through the same
query, and the caller answers each with the same ``WidgetNotFound``. There is no string comparison
of keys in Python to time: the only comparison is the B-tree's, on a hash the caller cannot steer.
Nothing about the key is validated before the lookup (a malformed key is just an unknown one), so
there is no early exit either.
"""

from __future__ import annotations

import hashlib

KEY_PREFIX = "hh_wk_"


def hash_key(key: str) -> bytes:
    """``sha256(key)``, as stored in ``agents.widget_key_hash``."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
