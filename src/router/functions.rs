//! Which function calls a replica may run. Anything not known to be free of side
//! effects goes to the primary: a user function may write, and a write sent to a replica
//! fails, while a read sent to the primary only costs a little load.

/// Functions whose call ties the client to one backend (session-scoped side effects).
pub fn pins_session(name: &str) -> Option<&'static str> {
    match name {
        "pg_advisory_lock" | "pg_advisory_lock_shared" | "pg_try_advisory_lock" | "pg_try_advisory_lock_shared" => {
            Some("session advisory lock")
        }
        "set_config" => Some("set_config() changes session state"),
        "dblink_connect" | "dblink_connect_u" => Some("dblink connection"),
        _ => None,
    }
}

/// `pg_*` functions that change something; all other `pg_*` functions only inspect.
const PG_WRITERS: &[&str] = &[
    "pg_advisory",
    "pg_try_advisory",
    "pg_notify",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_",
    "pg_drop_replication_slot",
    "pg_copy_",
    "pg_logical_",
    "pg_replication_slot_advance",
    "pg_replication_origin",
    "pg_wal_replay_",
    "pg_stat_reset",
    "pg_backup_",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_import_system_collations",
    "pg_rotate_logfile",
    "pg_log_backend_memory_contexts",
    "pg_current_xact_id",
    "pg_file_",
    "pg_catalog.",
    "pg_nextoid",
    "pg_sequence_last_value",
    "pg_prewarm",
    "pg_truncate",
];

const READ_ONLY: &[&str] = &[
    // aggregates and window functions
    "count", "sum", "avg", "min", "max", "array_agg", "string_agg", "json_agg", "jsonb_agg",
    "json_object_agg", "jsonb_object_agg", "bool_and", "bool_or", "every", "bit_and", "bit_or",
    "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "corr",
    "covar_pop", "covar_samp", "mode", "percentile_cont", "percentile_disc", "rank",
    "dense_rank", "row_number", "ntile", "lag", "lead", "first_value", "last_value",
    "nth_value", "cume_dist", "percent_rank", "xmlagg",
    // math
    "abs", "ceil", "ceiling", "floor", "round", "trunc", "sign", "sqrt", "cbrt", "exp", "ln",
    "log", "log10", "power", "pow", "mod", "div", "pi", "degrees", "radians", "sin", "cos",
    "tan", "asin", "acos", "atan", "atan2", "greatest", "least", "random", "width_bucket",
    "gen_random_uuid",
    // conditionals
    "coalesce", "nullif",
    // strings
    "length", "char_length", "character_length", "octet_length", "bit_length", "lower",
    "upper", "initcap", "trim", "btrim", "ltrim", "rtrim", "lpad", "rpad", "substr",
    "substring", "position", "strpos", "replace", "translate", "concat", "concat_ws",
    "format", "left", "right", "repeat", "reverse", "split_part", "regexp_replace",
    "regexp_match", "regexp_matches", "regexp_split_to_array", "regexp_split_to_table",
    "regexp_like", "regexp_count", "starts_with", "md5", "sha224", "sha256", "sha384", "sha512",
    "encode", "decode", "to_hex", "ascii", "chr", "quote_ident", "quote_literal",
    "quote_nullable", "string_to_array", "string_to_table", "unistr", "normalize",
    // arrays and sets
    "array_to_string", "array_length", "array_lower", "array_upper", "array_ndims",
    "array_dims", "array_position", "array_positions", "array_append", "array_prepend",
    "array_cat", "array_remove", "array_replace", "cardinality", "unnest", "generate_series",
    "generate_subscripts",
    // date and time
    "now", "current_timestamp", "current_date", "current_time", "localtime", "localtimestamp",
    "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday",
    "date_trunc", "date_part", "date_bin", "extract", "age", "make_date", "make_time",
    "make_timestamp", "make_timestamptz", "make_interval", "to_char", "to_date",
    "to_timestamp", "to_number", "justify_days", "justify_hours", "justify_interval",
    "isfinite",
    // json
    "json_build_object", "jsonb_build_object", "json_build_array", "jsonb_build_array",
    "to_json", "to_jsonb", "row_to_json", "array_to_json", "json_array_length",
    "jsonb_array_length", "json_each", "jsonb_each", "json_each_text", "jsonb_each_text",
    "json_extract_path", "jsonb_extract_path", "json_extract_path_text",
    "jsonb_extract_path_text", "json_object_keys", "jsonb_object_keys", "json_typeof",
    "jsonb_typeof", "jsonb_set", "jsonb_insert", "jsonb_pretty", "jsonb_strip_nulls",
    "json_strip_nulls", "jsonb_path_query", "jsonb_path_exists", "jsonb_path_match",
    "jsonb_path_query_array", "jsonb_path_query_first", "json_populate_record",
    "jsonb_populate_record", "json_to_record", "jsonb_to_record", "json_to_recordset",
    "jsonb_to_recordset", "json_array_elements", "jsonb_array_elements",
    "json_array_elements_text", "jsonb_array_elements_text", "json_object", "jsonb_object",
    // session and system information
    "current_setting", "current_user", "session_user", "user", "current_role",
    "current_schema", "current_schemas", "current_database", "current_catalog", "version",
    "inet_server_addr", "inet_server_port", "inet_client_addr", "inet_client_port",
    "has_table_privilege", "has_schema_privilege", "has_database_privilege",
    "has_column_privilege", "has_function_privilege", "has_sequence_privilege",
    "obj_description", "col_description", "shobj_description", "format_type", "to_regclass",
    "to_regtype", "to_regproc", "to_regnamespace", "to_regrole", "txid_current_snapshot",
    "txid_snapshot_xmin", "txid_snapshot_xmax", "txid_visible_in_snapshot",
    // network and misc casts written as calls
    "host", "hostmask", "netmask", "network", "broadcast", "family", "masklen", "abbrev",
    "text", "numeric", "int4", "int8", "float8", "bool", "date", "timestamp", "timestamptz",
    "interval", "uuid", "row", "exists", "any", "all", "array", "cast",
];

/// True if a replica may run this (lower-case, possibly schema-qualified) function.
pub fn is_read_only(name: &str) -> bool {
    let name = name.strip_prefix("pg_catalog.").unwrap_or(name);
    if name.contains('.') {
        // A schema-qualified name outside pg_catalog is a user function.
        return false;
    }
    if name.starts_with("pg_") {
        return !PG_WRITERS.iter().any(|w| name.starts_with(w));
    }
    READ_ONLY.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_effects_are_not_read_only() {
        for f in ["nextval", "setval", "pg_advisory_lock", "pg_advisory_xact_lock", "pg_notify", "my_func", "app.f", "txid_current", "lastval", "currval"] {
            assert!(!is_read_only(f), "{f}");
        }
        for f in ["count", "now", "pg_is_in_recovery", "pg_catalog.pg_backend_pid", "inet_server_port", "pg_last_wal_replay_lsn"] {
            assert!(is_read_only(f), "{f}");
        }
    }
}
