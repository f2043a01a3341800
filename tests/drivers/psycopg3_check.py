"""psycopg 3 through interceptor: parameters, prepared statements, binary
formats, server-side cursors, COPY both ways, LISTEN/NOTIFY, transactions.

usage: psycopg3_check.py CONNINFO SUFFIX
"""
import sys

import psycopg

conninfo, suffix = sys.argv[1], sys.argv[2]
table = f"py3_{suffix}"

with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, data bytea, score numeric)")

    # Parameters, and a statement prepared server-side on first use.
    for i in range(20):
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s, %s)", (i, f"n{i}", bytes([i, 0, 255]), i / 4), prepare=True)
    row = conn.execute(f"SELECT name, data, score FROM {table} WHERE id = %s", (7,), prepare=True).fetchone()
    assert row == ("n7", b"\x07\x00\xff", __import__("decimal").Decimal("1.75")), row

    # Binary result format.
    with conn.cursor(binary=True) as cur:
        cur.execute(f"SELECT id, data FROM {table} WHERE id < %s ORDER BY id", (3,))
        assert cur.fetchall() == [(0, b"\x00\x00\xff"), (1, b"\x01\x00\xff"), (2, b"\x02\x00\xff")]

    # COPY out and in, text and binary.
    with conn.cursor() as cur:
        with cur.copy(f"COPY (SELECT id, name FROM {table} ORDER BY id) TO STDOUT") as copy:
            out = b"".join(bytes(b) for b in copy)
        assert out.count(b"\n") == 20 and out.startswith(b"0\tn0\n"), out[:40]
        with cur.copy(f"COPY {table} (id, name) FROM STDIN") as copy:
            for i in range(100, 1100):
                copy.write_row((i, f"copied {i}"))
        with cur.copy(f"COPY (SELECT id FROM {table} WHERE id >= 100) TO STDOUT (FORMAT binary)") as copy:
            copy.set_types(["int4"])
            ids = [r[0] for r in copy.rows()]
        assert sorted(ids) == list(range(100, 1100)), len(ids)

    # Commit and rollback.
    conn.autocommit = False
    conn.execute(f"DELETE FROM {table} WHERE id >= 100")
    conn.rollback()
    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1020
    conn.execute(f"UPDATE {table} SET name = 'committed' WHERE id = 1")
    conn.commit()

    # Server-side (named) cursor: DECLARE + FETCH in batches.
    with conn.cursor(name="big") as cur:
        cur.itersize = 50
        cur.execute(f"SELECT id FROM {table} ORDER BY id")
        assert sum(1 for _ in cur) == 1020
    conn.commit()
    conn.autocommit = True

    # Errors keep the session usable.
    try:
        conn.execute("SELECT 1/0")
        raise AssertionError("division by zero did not fail")
    except psycopg.errors.DivisionByZero:
        pass

    # LISTEN/NOTIFY, payload and channel intact.
    conn.execute(f"LISTEN py3_ch_{suffix}")
    with psycopg.connect(conninfo, autocommit=True) as other:
        other.execute("SELECT pg_notify(%s, %s)", (f"py3_ch_{suffix}", "hello from the other side"))
    gen = conn.notifies(timeout=10)
    note = next(gen)
    gen.close()
    assert (note.channel, note.payload) == (f"py3_ch_{suffix}", "hello from the other side"), note

    assert conn.execute(f"SELECT name FROM {table} WHERE id = 1").fetchone()[0] == "committed"
    conn.execute(f"DROP TABLE {table}")

print("psycopg3 OK")
