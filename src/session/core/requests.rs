//! The client's messages on their way to the server: statement names rewritten to the
//! proxy-wide ones, a Parse injected in front of a Bind or Describe of a statement the
//! held server lacks, a Parse the server already holds as its unnamed statement answered
//! here, and for every message sent, what the proxy expects back (`expect.rs`).

use super::*;

impl<H: ServerHandle> Core<H> {
    pub(super) fn push_expect(&mut self, e: Expect) {
        self.flight.expect.push_back(e);
    }

    fn server_unnamed_is(&self, id: u64) -> bool {
        self.server
            .as_ref()
            .is_some_and(|h| h.conn.state().unnamed == Some(id))
    }

    fn set_server_unnamed(&mut self, id: Option<u64>) {
        if let Some(held) = self.server.as_mut() {
            held.conn.state_mut().unnamed = id;
        }
    }

    pub(super) fn forget_server_unnamed(&mut self) {
        self.set_server_unnamed(None);
    }

    /// Before a Bind or Describe of the unnamed statement: the held server's unnamed
    /// statement must be the client's, which may have been parsed on another server
    /// (a Parse is injected). A client without one must get Postgres's error, not
    /// whatever the server was left with by others (a Close is injected).
    fn ensure_unnamed_on_server(&mut self, parsed_unnamed: &mut bool) {
        if *parsed_unnamed {
            return;
        }
        *parsed_unnamed = true;
        match self.unnamed.clone() {
            Some(statement) if !self.server_unnamed_is(statement.id) => {
                msg::parse_with_name(&mut self.server_out, "", &statement.tail);
                self.flight
                    .expect
                    .push_back(Expect::InjectedParse { id: None });
                self.set_server_unnamed(Some(statement.id));
            }
            Some(_) => {}
            None => {
                msg::close(&mut self.server_out, b'S', "");
                self.flight.expect.push_back(Expect::InjectedClose);
                self.forget_server_unnamed();
            }
        }
    }

    /// The client's statement of that name, as the server will see it at this point
    /// of the stream: after a `DEALLOCATE ALL` executed earlier before the same Sync,
    /// only the names parsed since exist (the proxy forgets the others when the server
    /// reports it ran, which is after this message is sent).
    fn client_statement(&self, name: &str) -> Option<Arc<PreparedStatement>> {
        if let Some(names) = &self.flight.deallocated_in_stretch
            && !names.iter().any(|n| n == name)
        {
            return None;
        }
        self.statements.get(name).cloned()
    }

    /// Makes sure the held server has `statement`, injecting a Parse if it does not.
    fn ensure_prepared(&mut self, statement: &PreparedStatement) {
        let Some(held) = self.server.as_mut() else {
            return;
        };
        if held.conn.state_mut().prepared.insert(statement.id) {
            msg::parse_with_name(
                &mut self.server_out,
                &statement.server_name,
                &statement.tail,
            );
            self.flight.expect.push_back(Expect::InjectedParse {
                id: Some(statement.id),
            });
        }
    }

    pub(super) fn forward_client_frame(
        &mut self,
        frame: &[u8],
        statement: Option<Arc<PreparedStatement>>,
        parsed_unnamed: &mut bool,
        query_effects: &mut Vec<SessionEffect>,
    ) -> Result<(), End> {
        let tag = frame[0];
        match tag {
            msg::QUERY => {
                let effects = std::mem::take(query_effects);
                self.server_out.extend_from_slice(frame);
                self.push_expect(Expect::Ready {
                    effects,
                    sync: false,
                });
                self.forget_server_unnamed();
                // A simple Query drops the unnamed statement on Postgres. With
                // something in flight the change is recorded even when there is
                // nothing to drop: an earlier change undone by an error hands its
                // statement on to it (`undo_statement_changes`).
                let previous = self.unnamed.take();
                if previous.is_some() || self.flight.expect.len() > 1 {
                    self.push_expect(Expect::UndoUnnamed(previous));
                }
            }
            msg::PARSE => {
                let Frontend::Parse(Parse {
                    name,
                    sql: query,
                    tail,
                }) = Frontend::decode(frame)?
                else {
                    return Ok(());
                };
                let name = name.to_string();
                let statement = match statement {
                    Some(statement) => statement,
                    None => self.shared.statements.register(tail, || self.decide(query)),
                };
                if name.is_empty() {
                    *parsed_unnamed = true;
                    let previous = self.unnamed.take();
                    if let Some(held) = self.server.as_ref()
                        && held.conn.state().unnamed == Some(statement.id)
                        && self.tx_status != TxStatus::Failed
                        && !self.flight.expect.uncertain()
                    {
                        // The server's unnamed statement is this one already (left by
                        // this client or another): parsing it again would only repeat
                        // the server's parse analysis. Not while an earlier request
                        // that may change it is unanswered: a Parse refused or skipped
                        // there would leave the server another statement or none.
                        held.node
                            .stats
                            .parses_saved
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.push_expect(Expect::Synthetic(msg::PARSE_COMPLETE));
                        self.skipped_parse = true;
                    } else {
                        self.server_out.extend_from_slice(frame);
                        self.push_expect(Expect::Parse);
                        self.set_server_unnamed(Some(statement.id));
                    }
                    self.unnamed = Some(statement);
                    self.push_expect(Expect::UndoUnnamed(previous));
                } else if let Some(existing) = self.client_statement(&name) {
                    // The client holds this name: Postgres analyses the new text, then
                    // refuses to store it (42P05), and skips to Sync. The server does the
                    // same at this point of the stream when given the new text under the
                    // existing statement's shared name (made sure to exist first), the
                    // text's own errors first; the client's name stays.
                    self.ensure_prepared(&existing);
                    msg::parse_with_name(&mut self.server_out, &existing.server_name, tail);
                    self.push_expect(Expect::ParseDuplicate(name.into()));
                } else {
                    if let Some(names) = self.flight.deallocated_in_stretch.as_mut() {
                        names.push(name.clone());
                    }
                    let previous = self.statements.insert(name.clone(), statement.clone());
                    let fresh = self
                        .server
                        .as_mut()
                        .is_some_and(|h| h.conn.state_mut().prepared.insert(statement.id));
                    if fresh {
                        msg::parse_with_name(
                            &mut self.server_out,
                            &statement.server_name,
                            &statement.tail,
                        );
                        self.push_expect(Expect::ParseNamed { id: statement.id });
                    } else if self.tx_status == TxStatus::Failed {
                        // In a failed transaction Postgres refuses a Parse (25P02) unless
                        // it ends the transaction: let the server judge the text, as the
                        // unnamed statement, since it holds the name already.
                        msg::parse_with_name(&mut self.server_out, "", &statement.tail);
                        self.push_expect(Expect::ParseChecked);
                        self.forget_server_unnamed();
                    } else {
                        self.push_expect(Expect::Synthetic(msg::PARSE_COMPLETE));
                    }
                    self.push_expect(Expect::UndoNamed(Box::new((name, previous))));
                }
            }
            msg::BIND => {
                let Frontend::Bind(Bind {
                    portal,
                    statement: name,
                    rest,
                }) = Frontend::decode(frame)?
                else {
                    return Ok(());
                };
                if name.is_empty() {
                    self.ensure_unnamed_on_server(parsed_unnamed);
                    note_bound(
                        &mut self.flight.portal_effects,
                        portal,
                        self.unnamed.as_ref().map(|s| &s.decision),
                    );
                    self.server_out.extend_from_slice(frame);
                } else if let Some(statement) = self.client_statement(name) {
                    self.ensure_prepared(&statement);
                    self.note_named_use(statement.id);
                    note_bound(
                        &mut self.flight.portal_effects,
                        portal,
                        Some(&statement.decision),
                    );
                    let mut prefix = Vec::with_capacity(portal.len() + 1);
                    prefix.extend_from_slice(portal);
                    prefix.push(0);
                    msg::with_replaced_name(
                        &mut self.server_out,
                        msg::BIND,
                        &prefix,
                        &statement.server_name,
                        rest,
                    );
                } else {
                    // Unknown to us: the server answers with the proper error.
                    note_bound(&mut self.flight.portal_effects, portal, None);
                    self.server_out.extend_from_slice(frame);
                }
                self.push_expect(Expect::Bind);
            }
            msg::DESCRIBE => {
                let Frontend::Describe { target, name } = Frontend::decode(frame)? else {
                    return Ok(());
                };
                if target == Target::Statement && name.is_empty() {
                    self.ensure_unnamed_on_server(parsed_unnamed);
                }
                match (target, self.client_statement(name)) {
                    (Target::Statement, Some(statement)) if !name.is_empty() => {
                        self.ensure_prepared(&statement);
                        self.note_named_use(statement.id);
                        msg::with_replaced_name(
                            &mut self.server_out,
                            msg::DESCRIBE,
                            b"S",
                            &statement.server_name,
                            &[],
                        );
                    }
                    _ => self.server_out.extend_from_slice(frame),
                }
                self.push_expect(Expect::Describe);
            }
            msg::CLOSE => {
                let Frontend::Close { target, name } = Frontend::decode(frame)? else {
                    return Ok(());
                };
                if target == Target::Statement && !name.is_empty() {
                    // Proxy-named statements stay on the servers for other clients.
                    let previous = self.statements.remove(name);
                    self.push_expect(Expect::Synthetic(msg::CLOSE_COMPLETE));
                    if previous.is_some() || self.flight.expect.len() > 1 {
                        self.push_expect(Expect::UndoNamed(Box::new((name.to_string(), previous))));
                    }
                } else {
                    self.server_out.extend_from_slice(frame);
                    self.push_expect(Expect::Close);
                    if target == Target::Portal {
                        note_bound(&mut self.flight.portal_effects, name.as_bytes(), None);
                    }
                    if target == Target::Statement {
                        self.forget_server_unnamed();
                        let previous = self.unnamed.take();
                        if previous.is_some() || self.flight.expect.len() > 1 {
                            self.push_expect(Expect::UndoUnnamed(previous));
                        }
                    }
                }
            }
            msg::EXECUTE => {
                // Read only when a portal may change the session: the rest of the
                // message is the server's to judge.
                let flight = &mut *self.flight;
                if !flight.portal_effects.is_empty()
                    && let Frontend::Execute { portal } = Frontend::decode(frame)?
                    && let Some((_, decision)) =
                        flight.portal_effects.iter().find(|(p, _)| &**p == portal)
                {
                    if decision
                        .effects
                        .contains(&SessionEffect::ForgetClientStatements)
                    {
                        flight.deallocated_in_stretch = Some(Vec::new());
                    }
                    flight
                        .group_effects
                        .extend(decision.effects.iter().cloned());
                }
                self.server_out.extend_from_slice(frame);
                self.push_expect(Expect::Execute);
            }
            msg::SYNC => {
                self.flight.deallocated_in_stretch = None;
                self.server_out.extend_from_slice(frame);
                let effects = std::mem::take(&mut self.flight.group_effects);
                self.push_expect(Expect::Ready {
                    effects,
                    sync: true,
                });
            }
            msg::FLUSH => self.server_out.extend_from_slice(frame),
            msg::FUNCTION_CALL => {
                self.server_out.extend_from_slice(frame);
                self.push_expect(Expect::FunctionCall);
            }
            // COPY data pipelined into the unit, in order (see `forward_copy_frame`).
            msg::COPY_DATA | msg::COPY_DONE | msg::COPY_FAIL => {
                self.server_out.extend_from_slice(frame);
                self.note_copy_end(tag);
            }
            other => return Err(invalid_message(other)),
        }
        match tag {
            msg::SYNC | msg::QUERY | msg::FUNCTION_CALL => self.mid_batch = false,
            msg::PARSE | msg::BIND | msg::DESCRIBE | msg::CLOSE | msg::EXECUTE | msg::FLUSH => {
                self.mid_batch = true
            }
            _ => {}
        }
        Ok(())
    }
}

/// Records what executing `portal` will change in the session (`None`: nothing). Most
/// statements change nothing, and then nothing is stored.
fn note_bound(
    portal_effects: &mut Vec<(Box<[u8]>, Arc<Decision>)>,
    portal: &[u8],
    decision: Option<&Arc<Decision>>,
) {
    let decision = decision.filter(|d| !d.effects.is_empty());
    if portal_effects.is_empty() && decision.is_none() {
        return;
    }
    match portal_effects.iter().position(|(p, _)| &**p == portal) {
        Some(i) => match decision {
            Some(d) => portal_effects[i].1 = d.clone(),
            None => {
                portal_effects.swap_remove(i);
            }
        },
        None => {
            if let Some(d) = decision {
                portal_effects.push((portal.into(), d.clone()));
            }
        }
    }
}

/// Whether forwarding `unit` depends on which prepared statements the client and its
/// server have: a Parse of a name (the server may hold its statement already), a Bind
/// or Describe of a name, or of the unnamed statement when the unit does not parse it
/// first. Such a unit waits while the outcome of an earlier request that may change
/// them is unknown (`ExpectQueue::uncertain`), since the server's answer to that
/// request decides what the client's names mean.
pub(super) fn relies_on_statements(unit: &[BytesMut]) -> bool {
    let mut parsed_unnamed = false;
    for frame in unit {
        if !matches!(frame[0], msg::PARSE | msg::BIND | msg::DESCRIBE) {
            continue;
        }
        // A malformed message waits too: the server's answers before it decide
        // nothing about it, but waiting is never wrong.
        let statement = match Frontend::decode(frame) {
            Ok(Frontend::Parse(parse)) if parse.name.is_empty() => {
                parsed_unnamed = true;
                continue;
            }
            Ok(Frontend::Bind(bind)) => bind.statement,
            Ok(Frontend::Describe {
                target: Target::Statement,
                name,
            }) => name,
            Ok(Frontend::Describe { .. }) => continue,
            _ => return true,
        };
        if !(statement.is_empty() && parsed_unnamed) {
            return true;
        }
    }
    false
}
