use super::*;

fn row(id: i64, key: Option<&str>) -> OutboxRow {
    let mut row = OutboxRow::defective(id, 0, key.map(str::to_string), String::new());
    row.defect = None;
    row.routing_key = "q".into();
    row
}

fn ledger() -> Ledger<()> {
    Ledger::new(Arc::new(Metrics::new()))
}

fn send(l: &mut Ledger<()>, r: OutboxRow) {
    let r = l.admit(r).unwrap_or_else(|| panic!("row should go now"));
    l.sent(&r, ());
}

#[test]
fn acks_in_publish_order_become_marks() {
    let mut l = ledger();
    send(&mut l, row(1, Some("a")));
    send(&mut l, row(2, None));
    l.settle_front(Ok(Verdict::Delivered));
    l.settle_front(Ok(Verdict::Delivered));
    assert_eq!(l.marks(), &[1, 2]);
    assert!(l.holds_nothing());
    l.marks_written(false);
    assert!(l.marks().is_empty());
}

#[test]
fn a_nack_charges_its_row_and_holds_its_key() {
    let mut l = ledger();
    send(&mut l, row(1, Some("a")));
    l.settle_front(Ok(Verdict::Nacked));
    assert_eq!(l.failures().len(), 1);
    assert!(!l.failures()[0].park_now);
    assert!(
        l.admit(row(2, Some("a"))).is_none(),
        "row 2 must wait behind row 1's retry"
    );
    l.failures_recorded(&[]);
    l.new_claim();
    assert!(l.admit(row(2, Some("a"))).is_some());
}

#[test]
fn a_closed_channel_charges_nobody_and_makes_suspects() {
    let mut l = ledger();
    send(&mut l, row(1, Some("a")));
    send(&mut l, row(2, Some("b")));
    l.settle_front(Err(BrokerFault::ChannelClosed {
        reason: "406".into(),
        code: Some(406),
    }));
    assert!(l.failures().is_empty(), "nobody is charged");
    assert_eq!(l.in_flight(), 0);
    assert!(l.holds_nothing());
    assert!(l.goes_alone(&row(1, None)) && l.goes_alone(&row(2, None)));
    assert_eq!(l.take_trouble(), Some(Trouble::Channel));
    assert_eq!(l.take_trouble(), None);
}

#[test]
fn a_lost_connection_charges_nobody_and_makes_no_suspects() {
    let mut l = ledger();
    send(&mut l, row(1, Some("a")));
    l.broker_fault(
        &BrokerFault::ConnectionLost {
            reason: "reset".into(),
        },
        None,
    );
    assert!(l.failures().is_empty());
    assert!(!l.goes_alone(&row(1, None)));
    assert_eq!(l.take_trouble(), Some(Trouble::Connection));
    // The key's bookkeeping starts over: its next row goes at once.
    assert!(l.admit(row(1, Some("a"))).is_some());
}

#[test]
fn a_row_that_closes_the_channel_alone_is_charged_and_always_goes_alone() {
    let mut l = ledger();
    send(&mut l, row(7, Some("a")));
    l.broker_fault(
        &BrokerFault::ChannelClosed {
            reason: "x".into(),
            code: None,
        },
        None,
    );
    let _ = l.take_trouble();
    let suspect = l
        .admit(row(7, Some("a")))
        .unwrap_or_else(|| panic!("admitted"));
    assert!(l.goes_alone(&row(7, None)));
    l.settle_alone(
        &suspect,
        Err(BrokerFault::ChannelClosed {
            reason: "406 PRECONDITION_FAILED".into(),
            code: Some(406),
        }),
    );
    assert_eq!(l.failures().len(), 1);
    assert!(l.failures()[0].error.contains("published alone"));
    assert_eq!(l.take_trouble(), Some(Trouble::Channel));
    assert!(l.goes_alone(&row(7, None)), "a culprit always goes alone");
}

#[tokio::test(start_paused = true)]
async fn an_exchange_the_user_may_not_write_sends_its_rows_alone_for_a_while() {
    let mut l = ledger();
    let to = |id, exchange: &str| {
        let mut r = row(id, None);
        r.exchange = exchange.to_string();
        r
    };
    send(&mut l, to(7, "orders"));
    l.broker_fault(
        &BrokerFault::ChannelClosed {
            reason: "x".into(),
            code: Some(403),
        },
        None,
    );
    let _ = l.take_trouble();
    let suspect = l
        .admit(to(7, "orders"))
        .unwrap_or_else(|| panic!("admitted"));
    l.settle_alone(
        &suspect,
        Err(BrokerFault::ChannelClosed {
            reason: "ACCESS_REFUSED - access to exchange 'orders' refused".into(),
            code: Some(403),
        }),
    );
    let failure = &l.failures()[0];
    assert!(
        failure
            .error
            .contains("grant the relay's user write access to exchange 'orders'"),
        "{}",
        failure.error
    );
    // Another row to that exchange goes alone; rows elsewhere do not.
    assert!(l.goes_alone(&to(8, "orders")));
    assert!(!l.goes_alone(&to(9, "payments")));
    tokio::time::advance(REFUSED_EXCHANGE_TTL).await;
    assert!(!l.goes_alone(&to(8, "orders")), "only for a while");
}

#[test]
fn a_suspect_alone_on_a_lost_connection_is_not_charged() {
    let mut l = ledger();
    send(&mut l, row(7, None));
    l.broker_fault(
        &BrokerFault::ChannelClosed {
            reason: "x".into(),
            code: None,
        },
        None,
    );
    let suspect = l.admit(row(7, None)).unwrap_or_else(|| panic!("admitted"));
    l.settle_alone(
        &suspect,
        Err(BrokerFault::ConnectionLost {
            reason: "no confirm within 30s".into(),
        }),
    );
    assert!(
        l.failures().is_empty(),
        "a timeout says nothing about the row"
    );
    assert!(l.goes_alone(&row(7, None)), "still a suspect");
    assert_eq!(l.take_trouble(), Some(Trouble::Connection));
}

#[test]
fn parked_rows_let_their_key_go_on() {
    let mut l = ledger();
    let bad = l
        .admit(row(1, Some("a")))
        .unwrap_or_else(|| panic!("admitted"));
    l.not_sent(
        &bad,
        NotSent::Refused {
            error: "headers".into(),
            fault: Fault::InvalidRow,
        },
    );
    assert!(l.failures()[0].park_now);
    assert!(l.admit(row(2, Some("a"))).is_some());
}

#[test]
fn the_held_window_spans_what_is_in_flight_and_waiting() {
    let mut l = ledger();
    assert_eq!(l.held_window().highest, 0);
    send(&mut l, row(5, Some("a")));
    send(&mut l, row(9, None));
    l.claimed(HeldWindow::default(), 9);
    let w = l.held_window();
    assert_eq!((w.lowest, w.highest), (5, 9));
    l.settle_front(Ok(Verdict::Delivered));
    assert_eq!(l.held_window().lowest, 9);
}

#[tokio::test(start_paused = true)]
async fn the_front_remembers_when_it_was_sent() {
    let mut l = ledger();
    send(&mut l, row(1, None));
    let sent = l.front_sent_at().unwrap_or_else(|| panic!("in flight"));
    tokio::time::advance(std::time::Duration::from_secs(31)).await;
    assert!(sent.elapsed() >= std::time::Duration::from_secs(31));
}
