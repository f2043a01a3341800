//! What PostgreSQL's own catalog says about built-in functions and settings,
//! and which of them touch files, programs, roles or other sessions.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Serialize;

/// What calling a function can do, as far as policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FunctionClass {
    /// A built-in that reads or computes and changes nothing.
    Pure,
    /// A built-in that writes: sequences, large objects.
    Writes,
    /// `pg_notify`, or `set_config` of an ordinary setting.
    Session,
    /// Reads or writes server files, runs programs, changes settings that
    /// guard the audit or roles, or acts on other sessions or the server.
    Privileged,
    /// Code the proxy cannot see into: user functions, procedures, and
    /// built-ins that run a query given as a string.
    Opaque,
}

/// `pg_catalog` function names of PostgreSQL 15 with the volatility of each
/// overload (see the file's header for how it was made).
static BUILTINS: LazyLock<HashMap<&'static str, &'static str>> = LazyLock::new(|| {
    include_str!("pg15_functions.txt")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('|'))
        .collect()
});

/// Volatile built-ins that only read, wait or compute. Every other volatile
/// built-in is privileged until someone looks at it and lists it here.
const VOLATILE_READS: &[&str] = &[
    "clock_timestamp",
    "current_query",
    "currval",
    "gen_random_uuid",
    "lastval",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_all",
    "pg_advisory_unlock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_blocking_pids",
    "pg_collation_actual_version",
    "pg_current_wal_flush_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_lsn",
    "pg_database_collation_actual_version",
    "pg_database_size",
    "pg_get_wal_replay_pause_state",
    "pg_indexes_size",
    "pg_is_in_recovery",
    "pg_is_wal_replay_paused",
    "pg_jit_available",
    "pg_last_committed_xact",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_lock_status",
    "pg_notification_queue_usage",
    "pg_partition_ancestors",
    "pg_partition_tree",
    "pg_relation_size",
    "pg_safe_snapshot_blocking_pids",
    "pg_sequence_last_value",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_stat_clear_snapshot",
    "pg_stat_have_stats",
    "pg_table_size",
    "pg_tablespace_size",
    "pg_total_relation_size",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_xact_commit_timestamp",
    "pg_xact_commit_timestamp_origin",
    "pg_xact_status",
    "random",
    "setseed",
    "timeofday",
    "txid_status",
];

/// Volatile built-ins that write data the session owns or shares.
const VOLATILE_WRITES: &[&str] = &[
    "lo_close",
    "lo_creat",
    "lo_create",
    "lo_from_bytea",
    "lo_get",
    "lo_lseek",
    "lo_lseek64",
    "lo_open",
    "lo_put",
    "lo_tell",
    "lo_tell64",
    "lo_truncate",
    "lo_truncate64",
    "lo_unlink",
    "loread",
    "lowrite",
    "nextval",
    "setval",
];

/// Built-ins that run SQL handed to them as text: as opaque as `EXECUTE`.
const RUNS_QUERY_TEXT: &[&str] = &[
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "query_to_xmlschema",
    "ts_rewrite",
    "ts_stat",
];

/// Whether `name` is a built-in that runs SQL given to it as text.
pub fn runs_query_text(name: &str) -> bool {
    let bare = name.strip_prefix("pg_catalog.").unwrap_or(name);
    RUNS_QUERY_TEXT.contains(&bare)
}

/// Classifies a called function by its (possibly schema-qualified) name.
///
/// An unqualified name resolves to `pg_catalog` first because the catalog
/// schema leads every search path that policy lets a session set.
pub fn classify_function(name: &str) -> FunctionClass {
    let bare = match name.rsplit_once('.') {
        Some(("pg_catalog", f)) => f,
        Some(_) => return FunctionClass::Opaque,
        None => name,
    };
    let Some(volatility) = BUILTINS.get(bare) else {
        return FunctionClass::Opaque;
    };
    if RUNS_QUERY_TEXT.contains(&bare) {
        return FunctionClass::Opaque;
    }
    if bare == "pg_notify" || bare == "set_config" {
        // set_config is decided by its arguments; see the analysis.
        return FunctionClass::Session;
    }
    if !volatility.contains('v') {
        return FunctionClass::Pure;
    }
    if VOLATILE_READS.contains(&bare) {
        FunctionClass::Pure
    } else if VOLATILE_WRITES.contains(&bare) {
        FunctionClass::Writes
    } else {
        FunctionClass::Privileged
    }
}

/// Settings only a superuser may change in PostgreSQL 15 (`pg_settings`
/// context `superuser` or `superuser-backend`): audit logging, statistics,
/// replication role, library loading.
const SUPERUSER_SETTINGS: &[&str] = &[
    "allow_in_place_tablespaces",
    "allow_system_table_mods",
    "backtrace_functions",
    "commit_delay",
    "compute_query_id",
    "deadlock_timeout",
    "debug_discard_caches",
    "dynamic_library_path",
    "extension_destdir",
    "ignore_checksum_failure",
    "jit_debugging_support",
    "jit_dump_bitcode",
    "jit_profiling_support",
    "lc_messages",
    "lo_compat_privileges",
    "log_connections",
    "log_disconnections",
    "log_duration",
    "log_error_verbosity",
    "log_executor_stats",
    "log_lock_waits",
    "log_min_duration_sample",
    "log_min_duration_statement",
    "log_min_error_statement",
    "log_min_messages",
    "log_parameter_max_length",
    "log_parser_stats",
    "log_planner_stats",
    "log_replication_commands",
    "log_statement",
    "log_statement_sample_rate",
    "log_statement_stats",
    "log_temp_files",
    "log_transaction_sample_rate",
    "max_stack_depth",
    "session_preload_libraries",
    "session_replication_role",
    "temp_file_limit",
    "track_activities",
    "track_counts",
    "track_functions",
    "track_io_timing",
    "track_wal_io_timing",
    "update_process_title",
    "wal_compression",
    "wal_consistency_checking",
    "wal_init_zero",
    "wal_recycle",
    "zero_damaged_pages",
];

/// Settings any role may change that still undo a guard: who the session
/// is, how names resolve, row security, and the read-only default that
/// interceptor sets for read-only principals.
const GUARD_SETTINGS: &[&str] = &[
    "default_transaction_read_only",
    "local_preload_libraries",
    "role",
    "row_security",
    "search_path",
    "session_authorization",
    "transaction_read_only",
];

/// Whether PostgreSQL reads text sent in client encoding `name` as
/// interceptor reads it (UTF-8). The client-only encodings (SJIS, BIG5,
/// GBK, UHC, GB18030, JOHAB, SHIFT_JIS_2004) have two-byte characters whose
/// second byte can be `\`: `E'さ\' ; DROP TABLE users; -- '` is one string
/// in UTF-8, and in SJIS a string, then a DROP. Every other encoding keeps
/// ASCII bytes ASCII. Names compare as PostgreSQL compares them, without
/// case or punctuation.
pub fn client_encoding_is_safe(name: &str) -> bool {
    let clean: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    !matches!(
        clean.as_str(),
        "big5"
            | "win950"
            | "windows950"
            | "gbk"
            | "win936"
            | "windows936"
            | "gb18030"
            | "uhc"
            | "win949"
            | "windows949"
            | "johab"
            | "sjis"
            | "shiftjis"
            | "mskanji"
            | "win932"
            | "windows932"
            | "shiftjis2004"
    )
}

/// Whether setting `name` to `value` keeps PostgreSQL reading statement
/// text as interceptor's parser does (UTF-8, standard conforming strings).
/// With `standard_conforming_strings = off`, `'a\' , ' ; DROP TABLE users;
/// -- '` is two strings to the parser and a string, then a DROP, to the
/// server. Other settings change values, not how text is read. Names
/// compare without case, as PostgreSQL's do (a startup packet may say
/// `Client_Encoding`).
pub fn keeps_parsing(name: &str, value: &str) -> bool {
    match name.to_ascii_lowercase().as_str() {
        "client_encoding" => client_encoding_is_safe(value),
        "standard_conforming_strings" => matches!(
            value.to_ascii_lowercase().as_str(),
            "on" | "true" | "yes" | "1" | "t" | "y"
        ),
        _ => true,
    }
}

/// Settings whose value [`keeps_parsing`] judges.
pub fn affects_parsing(name: &str) -> bool {
    ["client_encoding", "standard_conforming_strings"]
        .iter()
        .any(|s| s.eq_ignore_ascii_case(name))
}

/// Whether changing `name` is a privilege question rather than an ordinary
/// session preference. Extension settings (`pgaudit.log`) count: they are
/// how extensions are switched off.
pub fn setting_is_guarded(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains('.')
        || name.starts_with("log_")
        || name.starts_with("track_")
        || SUPERUSER_SETTINGS.contains(&name.as_str())
        || GUARD_SETTINGS.contains(&name.as_str())
}

/// Catalogs that hold credentials, other roles' secrets or sample values of
/// every column (the planner's statistics), and views that read server
/// files (pg_hba.conf, pg_ident.conf, postgresql.conf); reading them is a
/// privilege question whatever the read rules say.
pub fn is_credential_catalog(table: &str) -> bool {
    let bare = table.strip_prefix("pg_catalog.").unwrap_or(table);
    matches!(
        bare,
        "pg_authid"
            | "pg_shadow"
            | "pg_user_mapping"
            | "pg_user_mappings"
            | "pg_statistic"
            | "pg_stats"
            | "pg_stats_ext"
            | "pg_stats_ext_exprs"
            | "pg_statistic_ext_data"
            | "pg_largeobject"
            | "pg_hba_file_rules"
            | "pg_ident_file_mappings"
            | "pg_file_settings"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_by_volatility_and_lists() {
        assert_eq!(classify_function("lower"), FunctionClass::Pure);
        assert_eq!(classify_function("pg_catalog.count"), FunctionClass::Pure);
        assert_eq!(classify_function("now"), FunctionClass::Pure);
        assert_eq!(classify_function("random"), FunctionClass::Pure);
        assert_eq!(classify_function("pg_read_file"), FunctionClass::Privileged);
        for unsafe_name in [
            "SJIS",
            "Shift_JIS",
            "shift-jis-2004",
            "WIN932",
            "gbk",
            "BIG5",
            "UHC",
        ] {
            assert!(!client_encoding_is_safe(unsafe_name), "{unsafe_name}");
        }
        for safe in [
            "UTF8",
            "utf-8",
            "unicode",
            "SQL_ASCII",
            "LATIN1",
            "EUC_JP",
            "WIN1252",
        ] {
            assert!(client_encoding_is_safe(safe), "{safe}");
        }
        assert!(keeps_parsing("standard_conforming_strings", "ON"));
        assert!(!keeps_parsing("standard_conforming_strings", "off"));
        assert!(!keeps_parsing("standard_conforming_strings", "false"));
        assert!(keeps_parsing("work_mem", "64MB"));
        assert!(affects_parsing("Client_Encoding"));
        assert!(!keeps_parsing("CLIENT_ENCODING", "sjis"));
        assert!(!keeps_parsing("Standard_Conforming_Strings", "off"));
        assert_eq!(
            classify_function("pg_catalog.pg_terminate_backend"),
            FunctionClass::Privileged
        );
        assert_eq!(classify_function("pg_ls_dir"), FunctionClass::Privileged);
        assert_eq!(classify_function("lo_import"), FunctionClass::Privileged);
        assert_eq!(classify_function("nextval"), FunctionClass::Writes);
        assert_eq!(classify_function("query_to_xml"), FunctionClass::Opaque);
        assert_eq!(classify_function("dblink"), FunctionClass::Opaque);
        assert_eq!(classify_function("evil.lower"), FunctionClass::Opaque);
        assert_eq!(classify_function("f_wipe"), FunctionClass::Opaque);
    }

    #[test]
    fn catalog_is_loaded() {
        assert!(BUILTINS.len() > 2500, "{} names", BUILTINS.len());
        for f in VOLATILE_READS
            .iter()
            .chain(VOLATILE_WRITES)
            .chain(RUNS_QUERY_TEXT)
        {
            assert!(
                BUILTINS.contains_key(f),
                "{f} is not a PostgreSQL 15 built-in"
            );
        }
    }

    #[test]
    fn guarded_settings() {
        for s in [
            "role",
            "ROLE",
            "search_path",
            "log_statement",
            "session_replication_role",
            "pgaudit.log",
            "track_counts",
            "row_security",
        ] {
            assert!(setting_is_guarded(s), "{s}");
        }
        for s in [
            "statement_timeout",
            "work_mem",
            "timezone",
            "application_name",
        ] {
            assert!(!setting_is_guarded(s), "{s}");
        }
    }
}
