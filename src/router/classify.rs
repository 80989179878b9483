//! Turns statement text into a routing [`Decision`] with sqlparser.
//!
//! The rule is conservative: only what is recognised as a read goes to a replica.
//! Anything the parser rejects goes to the primary, where every statement works.

use std::ops::ControlFlow;

use sqlparser::ast::{
    CopySource, Expr, ObjectName, Query, Reset, Set, SetExpr, Statement, TransactionAccessMode,
    TransactionIsolationLevel, TransactionMode, visit_expressions, visit_statements,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::decision::{Decision, PinReason, Route, SessionEffect, TxEffect};
use super::functions;

/// Classifies the full text of one Query or Parse message (may hold several statements).
pub fn classify(sql: &str) -> Decision {
    let hint = routing_hint(sql);
    let mut decision = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => {
            let mut merged = Decision::replica();
            for statement in &statements {
                merged.merge(&classify_statement(statement));
            }
            merged
        }
        Err(_) => classify_unparsed(sql),
    };
    if decision.pin.is_none() {
        decision.pin = lexical_pin(sql);
    }
    if decision.pin.is_some() {
        decision.route = Route::Primary;
    }
    if let Some(route) = hint {
        decision.route = route;
        decision.hinted = true;
    }
    decision
}

/// `/* replicator: primary */` or `/* replicator: replica */` at the start of the text.
pub fn routing_hint(sql: &str) -> Option<Route> {
    let rest = sql.trim_start().strip_prefix("/*")?;
    let (comment, _) = rest.split_once("*/")?;
    let value = comment.trim().strip_prefix("replicator:")?.trim();
    match value.to_ascii_lowercase().as_str() {
        "primary" | "master" => Some(Route::Primary),
        "replica" | "slave" => Some(Route::Replica),
        _ => None,
    }
}

fn classify_statement(statement: &Statement) -> Decision {
    match statement {
        Statement::Query(query) => classify_query(query),
        Statement::ShowVariable { .. } | Statement::ShowVariables { .. } => Decision::replica(),
        Statement::Explain {
            statement, analyze, ..
        } => {
            let inner = classify_statement(statement);
            // EXPLAIN without ANALYZE only plans, but a replica cannot plan every write
            // (e.g. on unlogged tables), so writes stay on the primary either way.
            let mut d = if inner.route == Route::Replica || !*analyze {
                Decision::with_route_of(&inner)
            } else {
                Decision::primary()
            };
            d.pin = inner.pin;
            d
        }
        Statement::Copy { source, to, .. } => {
            if *to {
                match source {
                    CopySource::Query(query) => classify_query(query),
                    CopySource::Table { .. } => Decision::replica(),
                }
            } else {
                Decision::primary()
            }
        }
        Statement::StartTransaction { modes, .. } => {
            let read_only = modes.iter().any(|m| {
                matches!(
                    m,
                    TransactionMode::AccessMode(TransactionAccessMode::ReadOnly)
                )
            });
            // Hot standby refuses SERIALIZABLE, so such transactions need the primary.
            let serializable = modes.iter().any(|m| {
                matches!(
                    m,
                    TransactionMode::IsolationLevel(TransactionIsolationLevel::Serializable)
                )
            });
            let mut d = if read_only && !serializable {
                Decision::replica()
            } else {
                Decision::primary()
            };
            d.tx = TxEffect::Begin;
            d
        }
        Statement::Commit { .. }
        | Statement::Rollback {
            savepoint: None, ..
        } => {
            let mut d = Decision::replica();
            d.tx = TxEffect::End;
            d
        }
        Statement::Set(set) => classify_set(set),
        Statement::Reset(reset) => {
            let mut d = Decision::replica();
            match &reset.reset {
                Reset::ALL => d.effects.push(SessionEffect::ResetAll),
                Reset::ConfigurationParameter(name) => d.effects.push(SessionEffect::Reset {
                    name: parameter_name(name),
                }),
                Reset::SessionAuthorization => {
                    d.effects.push(SessionEffect::Reset {
                        name: "session_authorization".into(),
                    });
                }
            }
            d
        }
        Statement::Discard { object_type } => {
            let mut d = Decision::primary();
            // Only DISCARD ALL resets settings and drops prepared statements; PLANS,
            // SEQUENCES and TEMP leave both alone (and the server's SET values with them).
            if matches!(object_type, sqlparser::ast::DiscardObject::ALL) {
                d.effects.push(SessionEffect::ResetAll);
                d.effects.push(SessionEffect::ForgetPrepared);
                d.effects.push(SessionEffect::ForgetClientStatements);
            }
            d
        }
        Statement::Deallocate { name, .. } => {
            let mut d = Decision::primary();
            d.effects.push(SessionEffect::ForgetPrepared);
            // `ALL` unquoted is the keyword; "ALL" quoted is a statement of that name.
            if name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all") {
                d.effects.push(SessionEffect::ForgetClientStatements);
            }
            d
        }
        Statement::LISTEN { .. } => pinned(PinReason::Listen),
        Statement::Prepare { .. } => pinned(PinReason::SqlPrepare),
        Statement::CreateTable(create) if create.temporary => pinned(PinReason::TemporaryTable),
        Statement::Declare { stmts, .. } => {
            if stmts.iter().any(|d| d.hold == Some(true)) {
                pinned(PinReason::CursorWithHold)
            } else {
                let mut d = Decision::primary();
                for declare in stmts {
                    if let Some(query) = &declare.for_query {
                        d = classify_query(query);
                    }
                }
                d
            }
        }
        _ => Decision::primary(),
    }
}

impl Decision {
    fn with_route_of(other: &Decision) -> Decision {
        if other.route == Route::Replica {
            Decision::replica()
        } else {
            Decision::primary()
        }
    }
}

fn pinned(reason: PinReason) -> Decision {
    let mut d = Decision::primary();
    d.pin = Some(reason);
    d
}

fn classify_query(query: &Query) -> Decision {
    if !query.locks.is_empty() {
        return Decision::primary();
    }
    let mut decision = Decision::replica();
    // Data-modifying CTEs and nested writes.
    let _ = visit_statements(query, |statement| {
        if !matches!(statement, Statement::Query(_)) {
            decision.route = Route::Primary;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    check_set_expr(&query.body, &mut decision);
    if let Some(with) = &query.with {
        for cte in &with.cte_tables {
            if !cte.query.locks.is_empty() {
                decision.route = Route::Primary;
            }
            check_set_expr(&cte.query.body, &mut decision);
        }
    }
    let _ = visit_expressions(query, |expr| {
        match expr {
            Expr::Function(function) => {
                let name = function_name(&function.name);
                if let Some(reason) = functions::pins_session(&name) {
                    decision.pin = Some(reason);
                    decision.route = Route::Primary;
                } else if !functions::is_read_only(&name) {
                    decision.route = Route::Primary;
                }
            }
            Expr::Subquery(q) | Expr::Exists { subquery: q, .. } if !q.locks.is_empty() => {
                decision.route = Route::Primary;
            }
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
    decision
}

fn check_set_expr(body: &SetExpr, decision: &mut Decision) {
    match body {
        SetExpr::Select(select) => {
            if let Some(into) = &select.into {
                decision.route = Route::Primary;
                if into.temporary {
                    decision.pin = Some(PinReason::TemporaryTable);
                }
            }
        }
        SetExpr::Query(query) => {
            if !query.locks.is_empty() {
                decision.route = Route::Primary;
            }
            check_set_expr(&query.body, decision);
        }
        SetExpr::SetOperation { left, right, .. } => {
            check_set_expr(left, decision);
            check_set_expr(right, decision);
        }
        SetExpr::Values(_) | SetExpr::Table(_) => {}
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
            decision.route = Route::Primary;
        }
    }
}

fn classify_set(set: &Set) -> Decision {
    let mut d = Decision::replica();
    match set {
        Set::SingleAssignment {
            scope,
            variable,
            values,
            ..
        } => {
            if matches!(scope, Some(sqlparser::ast::ContextModifier::Local)) {
                return d;
            }
            let name = parameter_name(variable);
            let value = values
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            if name == "transaction"
                || name.starts_with("transaction ")
                || name == "session characteristics"
            {
                return d;
            }
            if value.eq_ignore_ascii_case("default") {
                d.effects.push(SessionEffect::Reset { name });
            } else {
                d.effects.push(SessionEffect::Set { name, value });
            }
        }
        Set::SetTimeZone {
            local: false,
            value,
        } => d.effects.push(SessionEffect::Set {
            name: "timezone".into(),
            value: value.to_string(),
        }),
        Set::SetTimeZone { local: true, .. } => {}
        Set::SetNames { charset_name, .. } => d.effects.push(SessionEffect::Set {
            name: "client_encoding".into(),
            value: format!("'{}'", charset_name.value.replace('\'', "''")),
        }),
        Set::SetRole {
            context_modifier,
            role_name,
        } => {
            if !matches!(
                context_modifier,
                Some(sqlparser::ast::ContextModifier::Local)
            ) {
                match role_name {
                    Some(role) => d.effects.push(SessionEffect::Set {
                        name: "role".into(),
                        value: role.to_string(),
                    }),
                    None => d.effects.push(SessionEffect::Reset {
                        name: "role".into(),
                    }),
                }
            }
        }
        Set::SetSessionAuthorization(_) => return pinned(PinReason::SessionAuthorization),
        _ => return Decision::primary(),
    }
    d
}

fn parameter_name(name: &ObjectName) -> String {
    name.to_string().trim_matches('"').to_ascii_lowercase()
}

fn function_name(name: &ObjectName) -> String {
    name.to_string().replace('"', "").to_ascii_lowercase()
}

/// For text the parser rejects: the primary, plus pins recognised from keywords.
fn classify_unparsed(sql: &str) -> Decision {
    let mut d = Decision::primary();
    let words: Vec<String> = sql
        .split(|c: char| c.is_whitespace() || c == ';' || c == '(')
        .filter(|w| !w.is_empty())
        .take(3)
        .map(|w| w.to_ascii_lowercase())
        .collect();
    match words.first().map(String::as_str) {
        Some("listen") => d.pin = Some(PinReason::Listen),
        Some("prepare") => d.pin = Some(PinReason::SqlPrepare),
        Some("begin") | Some("start") => d.tx = TxEffect::Begin,
        Some("commit") | Some("end") | Some("abort") => d.tx = TxEffect::End,
        Some("rollback") if !sql.to_ascii_lowercase().contains(" to ") => d.tx = TxEffect::End,
        Some("declare") if sql.to_ascii_lowercase().contains("with hold") => {
            d.pin = Some(PinReason::CursorWithHold)
        }
        _ => {}
    }
    d
}

/// Pins recognised in the raw text, whatever the parser made of it.
fn lexical_pin(sql: &str) -> Option<PinReason> {
    let lower = sql.to_ascii_lowercase();
    for f in ["pg_advisory_lock", "pg_try_advisory_lock"] {
        let mut rest = lower.as_str();
        while let Some(at) = rest.find(f) {
            let after = &rest[at + f.len()..];
            // pg_advisory_lock( and pg_advisory_lock_shared( are session locks;
            // the _xact_ variants are released at commit and need no pin.
            if after.starts_with('(') || after.starts_with("_shared") {
                return Some(PinReason::SessionAdvisoryLock);
            }
            rest = after;
        }
    }
    let words: Vec<&str> = lower.split_whitespace().take(3).collect();
    if words.first() == Some(&"create")
        && words
            .iter()
            .skip(1)
            .any(|w| *w == "temp" || *w == "temporary")
    {
        return Some(PinReason::TemporaryObject);
    }
    None
}

#[cfg(test)]
mod tests;
