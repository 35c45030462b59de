"""Parameters the driver's own adapters send slowly, and the dumpers that send them fast.

``register_adapters`` must run before the connections that use them are made: psycopg copies its
global adapters into each connection when it opens. ``get_pool`` runs it before its first
connection; the driver is still imported only then, never when a function starts.
"""

from __future__ import annotations

import array
import functools
import struct
import sys
from collections.abc import Sequence

_ARRAY_HEADER = struct.Struct("!iiIii")
_FLOAT4_OID = 700


class Float4Array:
    """A ``real[]`` parameter, sent in binary (``%(name)b``): a vector's floats (``shared.retrieval``).

    psycopg's list dumper packs a Python list element by element (about 0.3 ms for 1536 floats);
    this packs it in a few C-level copies. Values round to single precision, as a pgvector
    ``vector`` stores them anyway.
    """

    __slots__ = ("values",)

    def __init__(self, values: Sequence[float]) -> None:
        self.values = array.array("f", values)


@functools.cache
def register_adapters() -> None:
    import psycopg
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class Float4ArrayDumper(Dumper):
        format = Format.BINARY
        oid = psycopg.adapters.types["float4"].array_oid

        def dump(self, obj: Float4Array) -> bytes:
            # PostgreSQL's binary array: dimensions, has-nulls, element type, length, lower bound,
            # then each element as its byte length (4) and its big-endian bytes.
            values = array.array("f", obj.values)
            if sys.byteorder == "little":
                values.byteswap()
            count = len(values)
            raw = values.tobytes()
            elements = bytearray(8 * count)
            elements[3::8] = b"\x04" * count
            for byte in range(4):
                elements[4 + byte :: 8] = raw[byte::4]
            return _ARRAY_HEADER.pack(1, 0, _FLOAT4_OID, count, 1) + bytes(elements)

    psycopg.adapters.register_dumper(Float4Array, Float4ArrayDumper)
