// pgjdbc through interceptor: server-side prepared statements, fetch-size
// cursors (portals with row limits), COPY both ways, LISTEN/NOTIFY, commit
// and rollback. usage: java -cp postgresql.jar:. JdbcCheck URL SUFFIX
import java.io.*;
import java.sql.*;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class JdbcCheck {
    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        String table = "jdbc_" + args[1];
        try (Connection c = DriverManager.getConnection(url)) {
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE IF EXISTS " + table);
                s.execute("CREATE TABLE " + table + " (id int PRIMARY KEY, name text, ts timestamptz DEFAULT now())");
            }
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + table + " (id, name) VALUES (?, ?)")) {
                for (int i = 0; i < 40; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "n" + i);
                    ps.executeUpdate();
                }
                for (int i = 40; i < 540; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "b" + i);
                    ps.addBatch();
                }
                ps.executeBatch();
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT name FROM " + table + " WHERE id = ?")) {
                ps.setInt(1, 5);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next() && rs.getString(1).equals("n5"), "select by id");
                }
            }

            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.execute("DELETE FROM " + table);
                c.rollback();
                s.setFetchSize(25);
                int n = 0;
                try (ResultSet rs = s.executeQuery("SELECT id FROM " + table + " ORDER BY id")) {
                    while (rs.next()) {
                        check(rs.getInt(1) == n, "cursor order");
                        n++;
                    }
                }
                check(n == 540, "rows via fetch-size cursor: " + n);
                s.execute("UPDATE " + table + " SET name = 'committed' WHERE id = 0");
                c.commit();
            }
            c.setAutoCommit(true);

            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder sb = new StringBuilder();
            for (int i = 1000; i < 3000; i++) sb.append(i).append("\tcopy ").append(i).append("\t2024-01-01\n");
            long in = cm.copyIn("COPY " + table + " FROM STDIN", new StringReader(sb.toString()));
            check(in == 2000, "copy in count " + in);
            StringWriter out = new StringWriter();
            long outN = cm.copyOut("COPY (SELECT id FROM " + table + " WHERE id >= 1000 ORDER BY id) TO STDOUT", out);
            check(outN == 2000 && out.toString().startsWith("1000\n1001\n"), "copy out");

            try (Statement s = c.createStatement()) {
                s.execute("SELECT 1/0");
                check(false, "division by zero must fail");
            } catch (SQLException e) {
                check("22012".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
            }

            try (Statement s = c.createStatement()) {
                s.execute("LISTEN jdbc_ch_" + args[1]);
            }
            try (Connection other = DriverManager.getConnection(url); Statement s = other.createStatement()) {
                s.execute("NOTIFY jdbc_ch_" + args[1] + ", 'jdbc payload'");
            }
            PGNotification[] notes = c.unwrap(PGConnection.class).getNotifications(10000);
            check(notes != null && notes.length == 1 && notes[0].getParameter().equals("jdbc payload"), "notification");

            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT name FROM " + table + " WHERE id = 0")) {
                check(rs.next() && rs.getString(1).equals("committed"), "committed row");
                s.execute("DROP TABLE " + table);
            }
        }
        System.out.println("pgjdbc OK");
    }
}
