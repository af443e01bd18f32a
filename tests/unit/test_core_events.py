"""The Event correlator (pure): what each occurrence becomes: a new Event, a count on one waiting to be
written, a series on one already written, one combined Event for many similar notes, or a counted drop."""

from __future__ import annotations

import asyncio

from fleetkeeper.core.clock import FakeClock
from fleetkeeper.core.events import COMBINED, EventCorrelator, WritePriority, event_key, node_ref

A = node_ref("node-a")
B = node_ref("node-b")


def test_identical_occurrences_waiting_are_one_event_with_a_count():
    c = EventCorrelator()
    assert c.observe(A, "Normal", "Quarantined", "ecc", "Reconcile", 100.0) == "queued"
    assert c.observe(A, "Normal", "Quarantined", "ecc", "Reconcile", 101.0) == "aggregated"
    assert c.observe(B, "Normal", "Quarantined", "ecc", "Reconcile", 101.0) == "queued"
    assert c.observe(A, "Warning", "Quarantined", "ecc", "Reconcile", 102.0) == "queued"  # another type
    p = c.pop()
    assert (p.obj, p.count, p.first, p.last) == (A, 2, 100.0, 101.0)
    assert [c.pop().obj for _ in range(2)] == [B, A]  # oldest first
    assert c.pop() is None


def test_a_repeat_within_the_window_continues_the_written_event_as_a_series():
    c = EventCorrelator(window=600.0)
    c.observe(A, "Normal", "Drained", "all pods evicted", "Reconcile", 100.0)
    p = c.pop()
    assert c.series_of(p.key, 100.0) is None  # nothing written yet: a new Event
    c.written(p.key, "node-a.1", p.count, 100.0)
    c.observe(A, "Normal", "Drained", "all pods evicted", "Reconcile", 400.0)
    q = c.pop()
    w = c.series_of(q.key, 400.0)
    assert (w.name, w.count) == ("node-a.1", 1)
    c.written(q.key, w.name, w.count + q.count, 400.0)
    assert c.series_of(q.key, 999.0).count == 2  # the window counts from the last observation
    assert c.series_of(q.key, 1001.0) is None  # past it: a new Event
    c.forget(q.key)
    assert c.series_of(q.key, 500.0) is None


def test_many_distinct_notes_of_one_reason_are_combined_not_recreated():
    c = EventCorrelator(max_similar=3)
    for i in range(3):
        assert c.observe(A, "Warning", "EvictionBlocked", f"retry in {i}s", "Reconcile", 100.0 + i) == "queued"
    assert c.observe(A, "Warning", "EvictionBlocked", "retry in 9s", "Reconcile", 104.0) == "queued"
    assert c.observe(A, "Warning", "EvictionBlocked", "retry in 8s", "Reconcile", 105.0) == "aggregated"
    combined = c.pending[event_key(A, "Warning", "EvictionBlocked", COMBINED + "EvictionBlocked")]
    assert combined.count == 2
    # a note seen before stays itself; other objects are not affected; the window frees the notes again
    assert c.observe(A, "Warning", "EvictionBlocked", "retry in 0s", "Reconcile", 106.0) == "aggregated"
    assert c.observe(B, "Warning", "EvictionBlocked", "retry in 9s", "Reconcile", 106.0) == "queued"
    assert c.observe(A, "Warning", "EvictionBlocked", "new", "Reconcile", 800.0) == "queued"
    assert event_key(A, "Warning", "EvictionBlocked", "new") in c.pending


def test_a_full_sink_drops_new_events_but_still_counts_repeats():
    c = EventCorrelator(max_pending=2)
    assert c.observe(A, "Normal", "R", "1", "Reconcile", 1.0) == "queued"
    assert c.observe(B, "Normal", "R", "1", "Reconcile", 1.0) == "queued"
    assert c.observe(node_ref("node-c"), "Normal", "R", "1", "Reconcile", 1.0) == "dropped"
    assert c.observe(A, "Normal", "R", "1", "Reconcile", 2.0) == "aggregated"  # takes no room
    c.pop()
    assert c.observe(node_ref("node-c"), "Normal", "R", "1", "Reconcile", 3.0) == "queued"


def test_series_memory_is_bounded():
    c = EventCorrelator(max_series=3)
    for i in range(5):
        c.written(event_key(node_ref(f"n{i}"), "Normal", "R", "x"), f"e{i}", 1, 1.0)
    assert [w.name for w in c.series.values()] == ["e2", "e3", "e4"]


async def test_event_writers_wait_for_node_writes_at_most_max_defer():
    clock = FakeClock()
    prio = WritePriority()
    await prio.quiet(clock, 5.0)  # nothing in flight: returns at once
    assert clock.monotonic() == 0.0

    with prio.writing():  # a node write in flight, done after 1 s
        q = asyncio.create_task(prio.quiet(clock, 5.0, poll=0.1))
        await clock.advance(0.5)
        assert not q.done()
    await clock.advance(0.2)
    await asyncio.wait_for(q, 1.0)  # returned once the write was done, before its 5 s
    assert prio.inflight == 0

    with prio.writing():  # a write that outlasts at_most: the Event goes anyway
        q = asyncio.create_task(prio.quiet(clock, 0.5, poll=0.1))
        await clock.advance(0.7)
        await asyncio.wait_for(q, 1.0)
        assert prio.inflight == 1


def test_similar_note_memory_is_bounded():
    c = EventCorrelator(max_series=3, max_similar=1)
    for i in range(5):
        c.observe(node_ref(f"n{i}"), "Normal", "R", "x", "Reconcile", 1.0)
    assert len(c._similar) == 3
