//! What the driver does about each kind of error, in one table: the rest of
//! the driver (and the ledger) asks [`action`] instead of deciding again.
//! (A failed connect has no choice to make: it backs off and tries again,
//! in `connect.rs`.)

use crate::metrics::FailureReason;

/// A kind of error the driver meets, told apart by what it says about the
/// row and about the connection it was met on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A row cannot be published as it is (its shape, or headers larger
    /// than the broker's frame).
    InvalidRow,
    /// A row names an exchange that does not exist.
    ExchangeNotFound,
    /// The broker returned a row: no queue took it.
    Unroutable,
    /// The broker nacked a row: it could not store it.
    Nacked,
    /// A row published alone closed the channel: it is the cause.
    ClosedChannelAlone,
    /// A row published alone was refused (403) by its exchange: it is the cause.
    AccessRefusedAlone,
    /// A row's lease lapsed since its claim: another relay may own it now.
    LeaseLost,
    /// The broker side broke before a row went.
    BrokerUnusable,
    /// The broker closed the channel with rows in flight: any of them may be
    /// the cause.
    ChannelClosed,
    /// The broker connection was lost, stalled, or cannot be trusted (a
    /// confirm timed out, an exchange check failed).
    ConnectionLost,
    /// A statement of the loop failed on a database connection that stands.
    StatementFailed,
    /// A statement failed because the database connection is gone.
    DatabaseLost,
}

/// What the driver does about a [`Fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Charge the row (recorded before the next claim): it goes again after
    /// its retry delay, and is parked once it reaches max-attempts.
    Retry,
    /// Park the row as a dead letter now.
    Park,
    /// The row stays pending, uncharged, and is claimed again.
    LeavePending,
    /// Charge the row, send it alone from now on, and open a new channel.
    RetryAloneOnNewChannel,
    /// Rows in flight become suspects (each goes alone once), uncharged; a
    /// new channel.
    NewChannel,
    /// Rows in flight go back to pending, uncharged; a new broker connection.
    Reconnect,
    /// Wait (a growing backoff), then try again on a later turn.
    Backoff,
    /// Back off, drop the database connection and connect again.
    ReconnectDatabase,
}

/// What the broker side needs before anything more is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trouble {
    /// The publishing channel is closed or cannot be trusted: a new one.
    Channel,
    /// The connection is lost, stalled or cannot be trusted: a new one.
    Connection,
}

/// The table.
pub const fn action(fault: Fault) -> Action {
    match fault {
        Fault::InvalidRow => Action::Park,
        Fault::ExchangeNotFound | Fault::Unroutable | Fault::Nacked => Action::Retry,
        Fault::ClosedChannelAlone | Fault::AccessRefusedAlone => Action::RetryAloneOnNewChannel,
        Fault::LeaseLost | Fault::BrokerUnusable => Action::LeavePending,
        Fault::ChannelClosed => Action::NewChannel,
        Fault::ConnectionLost => Action::Reconnect,
        Fault::StatementFailed => Action::Backoff,
        Fault::DatabaseLost => Action::ReconnectDatabase,
    }
}

impl Fault {
    /// The `publish_failures` label it is counted under, if any.
    pub const fn reason(self) -> Option<FailureReason> {
        match self {
            Fault::InvalidRow => Some(FailureReason::InvalidRow),
            Fault::ExchangeNotFound => Some(FailureReason::ExchangeNotFound),
            Fault::Unroutable => Some(FailureReason::Unroutable),
            Fault::Nacked => Some(FailureReason::Nack),
            Fault::ClosedChannelAlone | Fault::ChannelClosed => Some(FailureReason::ChannelClosed),
            Fault::AccessRefusedAlone => Some(FailureReason::AccessRefused),
            Fault::LeaseLost => Some(FailureReason::LeaseLost),
            Fault::ConnectionLost => Some(FailureReason::ConnectionLost),
            Fault::BrokerUnusable | Fault::StatementFailed | Fault::DatabaseLost => None,
        }
    }
}

impl Action {
    /// What the broker side needs before anything more is sent.
    pub const fn trouble(self) -> Option<Trouble> {
        match self {
            Action::RetryAloneOnNewChannel | Action::NewChannel => Some(Trouble::Channel),
            Action::Reconnect => Some(Trouble::Connection),
            Action::Retry
            | Action::Park
            | Action::LeavePending
            | Action::Backoff
            | Action::ReconnectDatabase => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_error_has_its_action() {
        let table = [
            (Fault::InvalidRow, Action::Park, None),
            (Fault::ExchangeNotFound, Action::Retry, None),
            (Fault::Unroutable, Action::Retry, None),
            (Fault::Nacked, Action::Retry, None),
            (
                Fault::ClosedChannelAlone,
                Action::RetryAloneOnNewChannel,
                Some(Trouble::Channel),
            ),
            (
                Fault::AccessRefusedAlone,
                Action::RetryAloneOnNewChannel,
                Some(Trouble::Channel),
            ),
            (Fault::LeaseLost, Action::LeavePending, None),
            (Fault::BrokerUnusable, Action::LeavePending, None),
            (
                Fault::ChannelClosed,
                Action::NewChannel,
                Some(Trouble::Channel),
            ),
            (
                Fault::ConnectionLost,
                Action::Reconnect,
                Some(Trouble::Connection),
            ),
            (Fault::StatementFailed, Action::Backoff, None),
            (Fault::DatabaseLost, Action::ReconnectDatabase, None),
        ];
        for (fault, want, trouble) in table {
            assert_eq!(action(fault), want, "{fault:?}");
            assert_eq!(action(fault).trouble(), trouble, "{fault:?}");
        }
    }
}
