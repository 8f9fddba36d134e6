"""Review of the device side of receipts: defects found after the merge, each shown by a test that failed before
its fix. The in-memory publisher (``fakes.FakePublisher``) and a real outbox; every wait is bounded."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from fakes import FakePublisher
from receipt_helpers import DEV, SITE, put_numbered, wait_for

from edgemed import receipts
from edgemed.errors import OutboxError
from edgemed.outbox import Outbox, OutboxConfig
from edgemed.publish.consumer import Consumer
from edgemed.publish.delivery import Delivery
from edgemed.publish.publisher import AckCallback

STREAM = receipts.stream_id(b"k" * 32)


def _start(
    ob: Outbox, *, timeout_s: float = 60.0, pub: FakePublisher | None = None
) -> tuple[FakePublisher, Consumer, Delivery]:
    pub = pub or FakePublisher()
    consumer = Consumer("dashboard", site=SITE, device_id=DEV, stream=STREAM, receipt_timeout_s=timeout_s)
    pub.listen(consumer.subscriptions, consumer.on_message, consumer.on_state)
    delivery = Delivery(ob, pub, consumer=consumer)
    pub.consumer_state("dashboard", "online")
    delivery.start()
    return pub, consumer, delivery


def _on(pub: FakePublisher, kind: str) -> list[bytes]:
    return [s.payload for s in list(pub.sent) if s.topic.rsplit("/", 1)[1] == kind]


class _BrokenPublisher(FakePublisher):
    """A publisher whose publish() fails once with an error nobody expected (a bug, a library's own error)."""

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, on_ack: AckCallback | None = None
    ) -> None:
        raise RuntimeError("unexpected")


def test_a_delivery_thread_ended_by_an_unexpected_error_says_so(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    delivery = Delivery(outbox, _BrokenPublisher())
    with caplog.at_level(logging.ERROR):
        delivery.start()
        try:
            put_numbered(outbox, 3)
            assert wait_for(lambda: delivery._thread is not None and not delivery._thread.is_alive())
            with pytest.raises(OutboxError, match=r"delivery stopped on an unexpected error \(RuntimeError"):
                delivery.check()
            started = time.monotonic()
            assert delivery.drain(5.0) == 3  # does not wait out its timeout for a thread that is gone
            assert time.monotonic() - started < 2.0
        finally:
            delivery.stop()
    assert "delivery stopped" in caplog.text
    assert outbox.pending_count() == 3  # nothing lost


def test_a_late_receipt_with_more_holes_neither_resends_nor_announces_lost_what_a_newer_one_released(
    outbox: Outbox,
) -> None:
    pub, _, delivery = _start(outbox)
    try:
        put_numbered(outbox, 6)
        assert wait_for(lambda: len(pub.sent) == 6)
        pub.ack()
        assert wait_for(lambda: outbox.awaiting_count() == 6)
        time.sleep(1.1)
        # The newer receipt: only seq 1 is missing. It releases 0 and 2-5 and sends 1 again.
        pub.receipt(SITE, DEV, STREAM, through_seq=0, missing=[(1, 1)], max_seq=5)
        assert wait_for(lambda: outbox.pending_count() == 1 and len(pub.sent) == 7)
        # From a lagging consumer process: the same through_seq and max_seq, but 2 and 3 not yet stored then.
        pub.receipt(SITE, DEV, STREAM, through_seq=0, missing=[(1, 3)], max_seq=5)
        time.sleep(0.3)
        assert _on(pub, "lost") == []  # 2 and 3 were stored: never announced lost
        assert len(pub.sent) == 7
        pub.ack()
        pub.receipt(SITE, DEV, STREAM, through_seq=5)
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()


def test_receipts_merge_what_each_settles() -> None:
    from edgemed.publish.consumer import union
    from edgemed.receipts import Progress

    newer = Progress(0, ((1, 1),), 5)
    older = Progress(0, ((1, 3),), 5)
    assert union(newer, older) == union(older, newer) == newer
    assert union(Progress(3), Progress(1, ((2, 4),), 9)) == Progress(3, ((4, 4),), 9)
    assert union(Progress(-1, ((0, 4),), 9), Progress(2)) == Progress(2, ((3, 4),), 9)
    assert union(Progress(-1), Progress(-1)) == Progress(-1)


def test_a_missing_result_sent_again_is_not_sent_again_on_every_receipt(outbox: Outbox) -> None:
    pub, consumer, delivery = _start(outbox)
    try:
        payloads = put_numbered(outbox, 3)
        assert wait_for(lambda: len(pub.sent) == 3)
        pub.ack()
        assert wait_for(lambda: outbox.awaiting_count() == 3)
        time.sleep(1.1)
        pub.receipt(SITE, DEV, STREAM, through_seq=0, missing=[(1, 1)], max_seq=2)
        assert wait_for(lambda: len(pub.sent) == 4) and pub.sent[3].payload == payloads[1]
        pub.ack()  # the copy sent again reached the broker; the consumer is behind and has not stored it yet
        for _ in range(6):  # receipts keep coming (4 a second) while it works through its backlog
            time.sleep(0.3)
            pub.receipt(SITE, DEV, STREAM, through_seq=0, missing=[(1, 1)], max_seq=2)
        time.sleep(0.2)
        assert len(pub.sent) == 4  # given the receipt timeout to arrive, like a first copy
        assert consumer.resent_total == 1
        pub.receipt(SITE, DEV, STREAM, through_seq=2)
        assert delivery.drain(5) == 0
    finally:
        delivery.stop()


def test_a_missing_result_is_sent_again_once_its_copy_had_the_receipt_timeout_to_arrive(outbox: Outbox) -> None:
    pub, consumer, delivery = _start(outbox, timeout_s=1.5)
    try:
        put_numbered(outbox, 3)
        assert wait_for(lambda: len(pub.sent) == 3)
        pub.ack()
        time.sleep(1.1)
        pub.receipt(SITE, DEV, STREAM, through_seq=0, missing=[(1, 1)], max_seq=2)
        assert wait_for(lambda: len(pub.sent) == 4)
        pub.ack()
        time.sleep(1.6)  # the broker lost the copy too: after the timeout it goes once more
        pub.receipt(SITE, DEV, STREAM, through_seq=0, missing=[(1, 1)], max_seq=2)
        assert wait_for(lambda: len(pub.sent) == 5)
        assert consumer.resent_total == 2
    finally:
        delivery.stop()


def test_results_not_receipted_in_time_are_sent_again_a_bounded_round_at_a_time(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgemed.publish import consumer as consumer_module

    monkeypatch.setattr(consumer_module, "_TIMEOUT_ROUND", 3)  # 500 in production
    pub, consumer, delivery = _start(outbox, timeout_s=1.0)
    try:
        payloads = put_numbered(outbox, 8)
        assert wait_for(lambda: len(pub.sent) == 8)
        pub.ack()
        assert wait_for(lambda: len(pub.sent) == 11, timeout_s=5.0)  # the oldest three, not the whole backlog
        time.sleep(0.3)
        assert len(pub.sent) == 11
        assert [s.payload for s in pub.sent[8:]] == payloads[:3]
        pub.ack()
        pub.receipt(SITE, DEV, STREAM, through_seq=2)  # the consumer stored the round: the next one goes now
        assert wait_for(lambda: len(pub.sent) == 14, timeout_s=0.9)
        assert [s.payload for s in pub.sent[11:]] == payloads[3:6]
        pub.ack()
        pub.receipt(SITE, DEV, STREAM, through_seq=5)
        assert wait_for(lambda: len(pub.sent) == 16, timeout_s=0.9)
        assert [s.payload for s in pub.sent[14:]] == payloads[6:]
        pub.ack()
        pub.receipt(SITE, DEV, STREAM, through_seq=7)
        assert delivery.drain(5) == 0
        assert consumer.resent_total == 8
    finally:
        delivery.stop()


def test_results_an_earlier_run_sent_and_nobody_receipted_are_sent_again_after_the_first_receipt(
    tmp_path: Path,
) -> None:
    # A run sent three results (PUBACK) and ended; the broker then crashed and lost them. The next process
    # (edgemed flush, or the next run) must not wait out a whole receipt timeout before sending them again.
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path, OutboxConfig(commit_every=1))
    payloads = put_numbered(first, 3)
    first.mark_sent(item.row_id for item in first.pending(10))
    first.close()
    time.sleep(0.01)
    ob = Outbox(path, OutboxConfig(commit_every=1))
    try:
        pub, consumer, delivery = _start(ob, timeout_s=600.0)
        try:
            assert wait_for(lambda: consumer.online)
            time.sleep(0.2)
            assert _on(pub, "results") == []  # no receipt yet: nothing to judge by
            pub.receipt(SITE, DEV, STREAM, 0)  # the consumer holds seq 0 only
            assert wait_for(lambda: len(_on(pub, "results")) == 2)
            assert _on(pub, "results") == payloads[1:]
            assert ob.pending_count() == 2
        finally:
            delivery.stop()
    finally:
        ob.close()


def test_without_any_receipt_an_earlier_runs_results_go_again_once_the_consumer_is_up_a_while(
    tmp_path: Path,
) -> None:
    # A new dashboard database (or a broker restarted without persistence) has no retained receipt to give.
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path, OutboxConfig(commit_every=1))
    payloads = put_numbered(first, 2)
    first.mark_sent(item.row_id for item in first.pending(10))
    first.close()
    time.sleep(0.01)
    ob = Outbox(path, OutboxConfig(commit_every=1))
    try:
        pub, _, delivery = _start(ob, timeout_s=600.0)
        try:
            assert wait_for(lambda: _on(pub, "results") == payloads, timeout_s=6.0)
        finally:
            delivery.stop()
    finally:
        ob.close()


def test_no_more_than_the_receipt_window_goes_out_while_the_consumer_has_not_receipted(outbox: Outbox) -> None:
    # Beyond it the broker would drop what exceeds its queue for the consumer (mosquitto: 1000 messages).
    from edgemed.publish import delivery as delivery_module

    window = delivery_module._UNRECEIPTED_MESSAGES
    payloads = put_numbered(outbox, window + 200)
    pub, _, delivery = _start(outbox, timeout_s=600.0)
    try:
        assert wait_for(lambda: len(_on(pub, "results")) >= window)
        pub.ack()
        assert wait_for(lambda: outbox.awaiting_count() == window)
        time.sleep(0.3)
        assert len(_on(pub, "results")) == window  # the rest waits on disk, unsent: the broker took them all
        assert outbox.unsent_count() == 200
        pub.receipt(SITE, DEV, STREAM, 299)  # the consumer stored the first 300
        assert wait_for(lambda: len(_on(pub, "results")) == window + 200)
        assert _on(pub, "results") == payloads
    finally:
        delivery.stop()


def test_a_tail_nobody_stored_goes_again_after_seconds_not_after_the_receipt_timeout(outbox: Outbox) -> None:
    # The broker dropped the last three (nothing above them was stored, so no receipt lists them as missing).
    payloads = put_numbered(outbox, 5)
    pub, _, delivery = _start(outbox, timeout_s=600.0)
    try:
        assert wait_for(lambda: len(_on(pub, "results")) == 5)
        pub.ack()
        assert wait_for(lambda: outbox.awaiting_count() == 5)
        pub.receipt(SITE, DEV, STREAM, 1)
        assert wait_for(lambda: outbox.pending_count() == 3)
        assert wait_for(lambda: len(_on(pub, "results")) == 8, timeout_s=6.0)
        assert _on(pub, "results")[5:] == payloads[2:]
        time.sleep(2.5)  # no progress since: the next round waits twice as long (4 s), not 2 s again
        assert len(_on(pub, "results")) == 8
    finally:
        delivery.stop()


def test_a_receipt_that_settles_more_than_the_device_committed_is_ignored(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    # A data directory restored from a backup counts from where the backup stopped, under the same stream: the
    # consumer's receipt of the later numbering must not release these results.
    put_numbered(outbox, 3)
    pub, _, delivery = _start(outbox, timeout_s=600.0)
    try:
        assert wait_for(lambda: len(_on(pub, "results")) == 3)
        pub.ack()
        assert wait_for(lambda: outbox.awaiting_count() == 3)
        with caplog.at_level(logging.WARNING, logger="edgemed.publish.delivery"):
            pub.receipt(SITE, DEV, STREAM, 5000)
            assert wait_for(lambda: "has committed only up to 2" in caplog.text)
        assert outbox.pending_count() == 3
        pub.receipt(SITE, DEV, STREAM, 1)  # a receipt of this numbering still works
        assert wait_for(lambda: outbox.pending_count() == 1)
    finally:
        delivery.stop()
