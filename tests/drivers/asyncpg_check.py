"""asyncpg through interceptor: binary protocol throughout, prepared
statements, portals with row limits (cursors), COPY both ways,
LISTEN/NOTIFY, transactions.

usage: asyncpg_check.py DSN SUFFIX [CAFILE]
"""
import asyncio
import ssl
import sys


async def main(dsn, suffix, cafile):
    import asyncpg

    kw = {}
    if cafile:
        ctx = ssl.create_default_context(cafile=cafile)
        kw["ssl"] = ctx
    else:
        kw["ssl"] = False
    table = f"apg_{suffix}"
    conn = await asyncpg.connect(dsn, **kw)
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
    await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, tags text[], doc jsonb)")

    stmt = await conn.prepare(f"INSERT INTO {table} VALUES ($1, $2, $3, $4)")
    for i in range(50):
        await stmt.fetch(i, f"n{i}", [f"t{i}", "x"], f'{{"i": {i}}}')
    await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3, $4)", [(i, f"m{i}", [], "{}") for i in range(50, 550)])
    row = await conn.fetchrow(f"SELECT name, tags, doc FROM {table} WHERE id = $1", 7)
    assert (row["name"], row["tags"], row["doc"]) == ("n7", ["t7", "x"], '{"i": 7}'), row

    # A cursor fetches through a portal in chunks (Execute with a row limit).
    async with conn.transaction():
        seen = [r["id"] async for r in conn.cursor(f"SELECT id FROM {table} ORDER BY id", prefetch=37)]
    assert seen == list(range(550)), len(seen)

    # Rollback and commit.
    try:
        async with conn.transaction():
            await conn.execute(f"DELETE FROM {table}")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 550
    async with conn.transaction():
        await conn.execute(f"UPDATE {table} SET name = 'c' WHERE id = 0")
    assert await conn.fetchval(f"SELECT name FROM {table} WHERE id = 0") == "c"

    # COPY (binary) in and out.
    await conn.copy_records_to_table(table, records=[(i, f"r{i}", None, None) for i in range(1000, 3000)], columns=["id", "name", "tags", "doc"])
    import io
    buf = io.BytesIO()
    await conn.copy_from_query(f"SELECT id, name FROM {table} WHERE id >= 1000 ORDER BY id", output=buf, format="csv")
    lines = buf.getvalue().decode().splitlines()
    assert len(lines) == 2000 and lines[0] == "1000,r1000", lines[:2]

    # Errors inside a transaction.
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1/0")
    except asyncpg.exceptions.DivisionByZeroError:
        pass
    assert await conn.fetchval("SELECT 1") == 1

    # LISTEN/NOTIFY.
    got = asyncio.get_running_loop().create_future()
    await conn.add_listener(f"apg_ch_{suffix}", lambda c, pid, ch, payload: got.done() or got.set_result((ch, payload)))
    other = await asyncpg.connect(dsn, **kw)
    await other.execute(f"NOTIFY apg_ch_{suffix}, 'payload-1'")
    await other.close()
    assert await asyncio.wait_for(got, 10) == (f"apg_ch_{suffix}", "payload-1")

    await conn.execute(f"DROP TABLE {table}")
    await conn.close()
    print("asyncpg OK")


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
