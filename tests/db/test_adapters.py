"""``shared.db.adapters``: what the fast dumpers send is what PostgreSQL reads."""

from __future__ import annotations

import array

from shared.db.adapters import Float4Array
from shared.db.session import run_as_service
from tests.conftest import Connection, TransactionDatabase


async def test_a_float4_array_reaches_postgres_exactly(db: Connection) -> None:
    values = [0.5, -1.25, 3.0e-3, 7.0e12, -0.0, 1.0e-40, *(i / 1537 for i in range(1530))]
    rows = await run_as_service(TransactionDatabase(db), "select %(v)b as v", {"v": Float4Array(values)})
    assert array.array("f", rows[0]["v"]) == array.array("f", values), "every value, single precision, in order"


async def test_a_float4_array_casts_to_a_vector(db: Connection) -> None:
    values = [1.0, -2.5, 0.125]
    rows = await run_as_service(
        TransactionDatabase(db), "select (%(v)b::extensions.vector(3))::text as v", {"v": Float4Array(values)}
    )
    assert rows[0]["v"] == "[1,-2.5,0.125]"


async def test_an_empty_float4_array_is_an_empty_array(db: Connection) -> None:
    rows = await run_as_service(TransactionDatabase(db), "select %(v)b as v", {"v": Float4Array([])})
    assert rows[0]["v"] == []
