"""Masked values in their normal types, through interceptor, for psycopg 3
(text and binary results, prepared) and asyncpg (binary throughout).

The table `masked_t` (see tests/tests/drivers.rs) has a card number under a
`partial` rule, and jsonb, int and bytea columns under `redact`.

usage: masking_check.py CONNINFO DSN
"""
import asyncio
import sys

import psycopg

conninfo, dsn = sys.argv[1], sys.argv[2]
SQL = "SELECT id, card, profile, pin, raw FROM masked_t WHERE id = %s"
EXPECTED = (1, "****1111", "[redacted]", None, b"")

with psycopg.connect(conninfo, autocommit=True) as conn:
    row = conn.execute(SQL, (1,)).fetchone()
    assert row == EXPECTED, f"text: {row!r}"
    row = conn.execute(SQL, (1,), prepare=True).fetchone()
    assert row == EXPECTED, f"prepared: {row!r}"
    with conn.cursor(binary=True) as cur:
        cur.execute(SQL, (1,))
        row = cur.fetchone()
        assert row == EXPECTED, f"binary: {row!r}"
    # An expression over the card keeps the card rule.
    row = conn.execute("SELECT upper(card) FROM masked_t WHERE id = 1").fetchone()
    assert row == ("****1111",), row
print("psycopg3 masking OK")


async def apg():
    import asyncpg

    conn = await asyncpg.connect(dsn, ssl=False)
    row = await conn.fetchrow("SELECT id, card, profile, pin, raw FROM masked_t WHERE id = $1", 1)
    got = (row["id"], row["card"], row["profile"], row["pin"], row["raw"])
    # asyncpg returns jsonb as its JSON text.
    assert got == (1, "****1111", '"[redacted]"', None, b""), got
    await conn.close()


asyncio.run(apg())
print("asyncpg masking OK")
