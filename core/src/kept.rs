//! The messages of the remote transaction being applied, kept while it is small, so that
//! it can be rolled back and applied again from its BEGIN without the peer sending it
//! again.
//!
//! Why (issue 17): a remote INSERT of a new key is applied as an ordinary insertion whose
//! index entries are checked as they are made. That spares the speculative insertion's
//! token lock and confirmation record (about a tenth of a one-row INSERT transaction's
//! instructions), but a row that meets an existing key cannot be undone alone: the
//! whole local transaction is rolled back and applied again, every insertion then the
//! careful way. Only a transaction whose every message since its BEGIN is still here
//! may take the ordinary path.
//!
//! Invariants:
//! - **Complete or nothing**: [`Kept::complete`] is true only while every message of the
//!   transaction that changed anything is held, in order, and all of them are INSERTs;
//!   once a message cannot be kept (an UPDATE or DELETE, too many, too big, a schema
//!   change, a TRUNCATE, a relation re-sent after a kept change of it), everything is
//!   dropped and the rest of the transaction takes the careful path.
//! - **Bounded memory**: at most [`MAX_MESSAGES`] messages and [`MAX_BYTES`] of column
//!   text are held, whatever the transaction's size.

use crate::wire::{Message, Value};

/// At most this many messages of one transaction are kept.
pub const MAX_MESSAGES: usize = 100;
/// At most this many bytes of column values are kept.
pub const MAX_BYTES: usize = 256 * 1024;

/// What to do with a message of the transaction before it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Apply it and keep it ([`Kept::push`] after applying).
    Keep,
    /// Apply it; nothing to keep (a relation before any change, a COMMIT).
    Pass,
    /// The transaction can no longer be kept whole: [`Kept::stop`] before applying it.
    Stop,
}

/// The kept messages of the current transaction.
#[derive(Debug, Default)]
pub struct Kept {
    messages: Vec<Message>,
    bytes: usize,
    complete: bool,
}

impl Kept {
    /// A transaction begins: keep its messages from now on.
    pub fn begin(&mut self) {
        self.messages.clear();
        self.bytes = 0;
        self.complete = true;
    }

    /// Whether every message since the BEGIN that changed anything is held.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// What to do with `m`, about to be applied.
    pub fn step(&self, m: &Message) -> Step {
        if !self.complete {
            return Step::Pass;
        }
        match m {
            Message::Insert(_) => {
                if self.messages.len() >= MAX_MESSAGES || self.bytes + row_bytes(m) > MAX_BYTES {
                    Step::Stop
                } else {
                    Step::Keep
                }
            }
            // Only a run of INSERTs from the BEGIN is kept: an UPDATE or DELETE
            // transaction (the other common shape) then pays nothing for keeping, and a
            // mixed one inserts the speculative way from its first UPDATE or DELETE on.
            Message::Update(_) | Message::Delete(_) => Step::Stop,
            // A relation sent again after a kept change of it may redefine what that
            // change was decoded against, and the mapping in force at a replay would be
            // the new one. Any other (a table's first change on this connection) is the
            // one every later kept change of it uses.
            Message::Relation(r)
                if self
                    .messages
                    .iter()
                    .any(|k| matches!(k, Message::Insert(i) if i.relation == r.id)) =>
            {
                Step::Stop
            }
            Message::Relation(_) => Step::Pass,
            Message::Commit(_) | Message::Begin(_) => Step::Pass,
            // A logical message that changes nothing (a synchronous commit's marker,
            // a join's) is not kept; the caller keeps what it set.
            Message::Message(x) if x.prefix != crate::ddl::DDL_PREFIX => Step::Pass,
            _ => Step::Stop,
        }
    }

    /// Keep `m` (after [`Kept::step`] said [`Step::Keep`] and it was applied).
    pub fn push(&mut self, m: Message) {
        if self.complete {
            self.bytes += row_bytes(&m);
            self.messages.push(m);
        }
    }

    /// The transaction can no longer be kept whole: drop what is held.
    pub fn stop(&mut self) {
        self.messages.clear();
        self.bytes = 0;
        self.complete = false;
    }

    /// Take the held messages to apply them again; nothing is kept after (the replay
    /// takes the careful path throughout).
    pub fn take(&mut self) -> Vec<Message> {
        self.complete = false;
        self.bytes = 0;
        std::mem::take(&mut self.messages)
    }

    /// The transaction ended: free what is held.
    pub fn end(&mut self) {
        self.stop();
    }
}

/// The bytes of column text a kept message carries (an INSERT's new row; 0 for any
/// other message, none of which is kept).
pub fn row_bytes(m: &Message) -> usize {
    match m {
        Message::Insert(i) => i
            .new
            .iter()
            .map(|x| match x {
                Value::Text(s) => s.len(),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Commit, Insert, LogicalMessage, Relation, ReplicaIdentity, Truncate};

    fn ins(len: usize) -> Message {
        Message::Insert(Insert {
            relation: 1,
            new: vec![Value::text("x".repeat(len)), Value::Null],
        })
    }

    fn rel() -> Message {
        Message::Relation(Relation {
            id: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![],
        })
    }

    #[test]
    fn keeps_a_small_transaction_whole() {
        let mut k = Kept::default();
        k.begin();
        assert_eq!(k.step(&rel()), Step::Pass);
        for _ in 0..3 {
            assert_eq!(k.step(&ins(10)), Step::Keep);
            k.push(ins(10));
        }
        assert!(k.complete());
        assert_eq!(k.take().len(), 3);
        // Nothing kept during the replay.
        assert!(!k.complete());
        assert_eq!(k.step(&ins(10)), Step::Pass);
    }

    #[test]
    fn stops_at_the_message_or_byte_limit() {
        let mut k = Kept::default();
        k.begin();
        for _ in 0..MAX_MESSAGES {
            assert_eq!(k.step(&ins(1)), Step::Keep);
            k.push(ins(1));
        }
        assert_eq!(k.step(&ins(1)), Step::Stop);
        k.stop();
        assert!(!k.complete());
        assert!(k.take().is_empty());

        k.begin();
        assert_eq!(k.step(&ins(MAX_BYTES)), Step::Keep);
        k.push(ins(MAX_BYTES));
        assert_eq!(k.step(&ins(1)), Step::Stop);
        assert_eq!(k.step(&ins(0)), Step::Keep);
        k.begin();
        assert_eq!(k.step(&ins(MAX_BYTES + 1)), Step::Stop);
    }

    #[test]
    fn a_relation_sent_again_a_truncate_or_ddl_stops() {
        let mut k = Kept::default();
        k.begin();
        k.push(ins(1));
        // Relation 1 again, after a kept change of it: stop; another relation: go on.
        assert_eq!(k.step(&rel()), Step::Stop);
        let Message::Relation(mut other) = rel() else {
            unreachable!()
        };
        other.id = 2;
        assert_eq!(k.step(&Message::Relation(other)), Step::Pass);
        assert_eq!(
            k.step(&Message::Truncate(Truncate {
                relations: vec![1],
                cascade: false,
                restart_identity: false,
            })),
            Step::Stop
        );
        let msg = |prefix: &str| {
            Message::Message(LogicalMessage {
                transactional: true,
                lsn: 0,
                prefix: prefix.into(),
                content: vec![],
            })
        };
        assert_eq!(k.step(&msg(crate::ddl::DDL_PREFIX)), Step::Stop);
        assert_eq!(k.step(&msg(crate::wire::SYNC_COMMIT_PREFIX)), Step::Pass);
        assert_eq!(
            k.step(&Message::Commit(Commit {
                commit_lsn: 1,
                end_lsn: 2,
                commit_time: 3,
            })),
            Step::Pass
        );
    }

    #[test]
    fn an_update_or_delete_stops_keeping() {
        use crate::wire::{Delete, OldRow, Update};
        let mut k = Kept::default();
        k.begin();
        k.push(ins(1));
        let u = Message::Update(Update {
            relation: 1,
            old: None,
            new: vec![Value::text("a")],
        });
        assert_eq!(k.step(&u), Step::Stop);
        let d = Message::Delete(Delete {
            relation: 1,
            old: OldRow::Key(vec![Value::text("a")]),
        });
        assert_eq!(k.step(&d), Step::Stop);
        k.stop();
        assert_eq!(k.step(&ins(1)), Step::Pass);
    }

    #[test]
    fn counts_the_text_of_an_inserted_row() {
        let i = Message::Insert(Insert {
            relation: 1,
            new: vec![Value::text("abc"), Value::UnchangedToast, Value::Null],
        });
        assert_eq!(row_bytes(&i), 3);
        assert_eq!(row_bytes(&ins(7)), 7);
        assert_eq!(row_bytes(&rel()), 0);
    }
}
