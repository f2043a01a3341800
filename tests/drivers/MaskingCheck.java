// pgjdbc through interceptor: masked values in their normal types, with
// server-side prepared statements (prepareThreshold=1) and binary transfer.
// usage: java MaskingCheck JDBC_URL
import java.sql.*;
import java.util.Arrays;

public class MaskingCheck {
    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0])) {
            for (int i = 0; i < 3; i++) {
                try (PreparedStatement p = c.prepareStatement(
                        "SELECT id, card, profile, pin, raw FROM masked_t WHERE id = ?")) {
                    p.setInt(1, 1);
                    try (ResultSet r = p.executeQuery()) {
                        check(r.next(), "a row");
                        check(r.getInt(1) == 1, "id");
                        check("****1111".equals(r.getString(2)), "card " + r.getString(2));
                        check("\"[redacted]\"".equals(r.getString(3)), "profile " + r.getString(3));
                        r.getInt(4);
                        check(r.wasNull(), "pin is NULL");
                        check(Arrays.equals(new byte[0], r.getBytes(5)), "raw is empty");
                    }
                }
            }
        }
        System.out.println("pgjdbc masking OK");
    }
}
