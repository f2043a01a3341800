"""A held statement through interceptor, from psycopg 3 (extended protocol
with parameters). The test decides it from the CLI while this waits.

usage: approval_check.py CONNINFO deny|delete
"""
import sys

import psycopg

conninfo, mode = sys.argv[1], sys.argv[2]
notices = []
with psycopg.connect(conninfo, autocommit=True) as conn:
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    if mode == "deny":
        try:
            conn.execute("UPDATE approval_t SET v = %s WHERE id = %s", (2000, 2))
        except psycopg.errors.InsufficientPrivilege as e:
            assert "not during the freeze" in str(e), str(e)
            assert "denied by approver alice" in str(e), str(e)
        else:
            sys.exit("the denied UPDATE ran")
        # The session goes on after a denial.
        assert conn.execute("SELECT v FROM approval_t WHERE id = 2").fetchone() == (2,)
        print("denied OK")
    elif mode == "delete":
        cur = conn.execute("DELETE FROM approval_t WHERE id = %s", (3,))
        assert cur.rowcount == 1, cur.rowcount
        print("deleted OK")
    assert any("held for approval" in n for n in notices), notices
