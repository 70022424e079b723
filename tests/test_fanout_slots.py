"""Big fan-outs take turns, one per core, among the worker processes of one server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from stream.broker import base
from stream.broker.base import FanoutBatch, LocalSubscription
from stream.event import Envelope
from tests.service import wait_for
from tests.test_direct_delivery import waiting_subscriptions as subscribers

BATCHES: list[FanoutBatch] = [([Envelope("1-0", "message", b"{}")], (1, 0), (1, 0), None)]


@pytest.fixture
def group(monkeypatch: pytest.MonkeyPatch) -> str:
    """Slots of this test's own, so that nothing else running here holds them."""
    name = f"stream-fanout-test-{uuid.uuid4().hex}"
    monkeypatch.setattr(base, "_slot_group", lambda: name)
    return name


class SlotPolls:
    """``time`` as stream.broker.base sees it, counting a fan-out's looks for a free slot."""

    monotonic = staticmethod(time.monotonic)
    thread_time = staticmethod(time.thread_time)

    def __init__(self) -> None:
        self.count = 0

    def sleep(self, seconds: float) -> None:
        if seconds == base._SLOT_POLL:
            self.count += 1
        time.sleep(seconds)


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> SlotPolls:
    clock = SlotPolls()
    monkeypatch.setattr(base, "time", clock)
    return clock


def recorder(into: list[int], tag: int) -> Callable[[list[Envelope]], bool]:
    def sink(batch: list[Envelope]) -> bool:
        into.append(tag)
        return True

    return sink


def fan_out_in_thread(subs: list[LocalSubscription]) -> threading.Thread:
    thread = threading.Thread(target=base.fan_out, args=(subs, BATCHES), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("slots", "take_turns"), [(1, True), (2, False), (0, False)])
def test_fan_outs_beyond_the_slots_take_turns(
    monkeypatch: pytest.MonkeyPatch, group: str, slots: int, take_turns: bool
) -> None:
    monkeypatch.setattr(base, "FANOUT_SLOTS", slots)
    order: list[str] = []
    # Both start together when both can: the first of each waits (briefly) for the other's.
    both = threading.Barrier(2, timeout=0.5)

    def sink_of(name: str) -> Callable[[list[Envelope]], bool]:
        def sink(batch: list[Envelope]) -> bool:
            if not order.count(name):
                try:
                    both.wait()
                except threading.BrokenBarrierError:
                    pass  # the other waits for a slot: this one goes alone
            until = time.perf_counter() + 20e-6  # a write's cost
            while time.perf_counter() < until:
                pass
            order.append(name)
            return True

        return sink

    # Each yields between its slices: without a slot each, the other runs meanwhile.
    threads = [
        fan_out_in_thread(subscribers(base.FANOUT_SLICE * 4, sink_of(name))) for name in "ab"
    ]
    for thread in threads:
        thread.join(10)
    assert len(order) == 2 * base.FANOUT_SLICE * 4
    runs = 1 + sum(1 for i in range(1, len(order)) if order[i] != order[i - 1])
    if take_turns:
        assert runs == 2, "one fan-out ran to its end before the other started"
    else:
        assert runs > 2, "both ran at once"


def test_a_fan_out_within_one_slice_takes_no_slot(
    monkeypatch: pytest.MonkeyPatch, group: str, polls: SlotPolls
) -> None:
    monkeypatch.setattr(base, "FANOUT_SLOTS", 1)
    held = base._take_slot()
    assert held is not None
    try:
        delivered: list[int] = []
        small = subscribers(base.FANOUT_SLICE, recorder(delivered, 1))
        assert base.fan_out(small, BATCHES) == []
        assert len(delivered) == base.FANOUT_SLICE
        big = subscribers(base.FANOUT_SLICE + 1, recorder(delivered, 2))
        thread = fan_out_in_thread(big)
        wait_for(lambda: polls.count >= 2)  # it found none free, and looked again
        assert delivered.count(2) == 0, "a bigger one waits for the slot"
    finally:
        held.close()
    thread.join(10)
    assert delivered.count(2) == base.FANOUT_SLICE + 1


def test_a_slot_is_shared_with_other_processes_and_freed_when_its_holder_dies(
    monkeypatch: pytest.MonkeyPatch, group: str, polls: SlotPolls
) -> None:
    monkeypatch.setattr(base, "FANOUT_SLOTS", 1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
            f"s.bind(b'\\0{group}-0')\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        delivered: list[int] = []
        thread = fan_out_in_thread(subscribers(base.FANOUT_SLICE * 2, recorder(delivered, 1)))
        wait_for(lambda: polls.count >= 2)
        assert delivered == [], "the other process holds the only slot"
        holder.kill()  # no close of its own: the kernel frees the name with the process
        holder.wait(10)
        thread.join(10)
        assert len(delivered) == base.FANOUT_SLICE * 2
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_the_workers_of_one_server_share_their_slots() -> None:
    # gunicorn's workers are its master's children: they name their slots after it.
    names = {
        subprocess.run(
            [sys.executable, "-c", "from stream.broker import base; print(base._slot_group())"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.getcwd(),
        ).stdout.strip()
        for _ in range(2)
    }
    assert names == {f"stream-fanout-{os.getpid()}"}


def test_slots_count_the_cores_this_process_may_run_on() -> None:
    assert base.FANOUT_SLOTS == len(os.sched_getaffinity(0))


def free(group: str, index: int) -> bool:
    """Whether slot ``index`` of ``group`` is free now (tried, not waited for)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.bind(f"\0{group}-{index}".encode())
    except OSError:
        return False
    finally:
        probe.close()
    return True


def test_a_fan_out_waits_for_a_slot_to_free_and_frees_it_when_done(
    monkeypatch: pytest.MonkeyPatch, group: str, polls: SlotPolls
) -> None:
    monkeypatch.setattr(base, "FANOUT_SLOTS", 2)
    first, second = base._take_slot(), base._take_slot()
    assert first is not None and second is not None
    try:
        assert not free(group, 0) and not free(group, 1)
        delivered: list[int] = []
        thread = fan_out_in_thread(subscribers(base.FANOUT_SLICE * 2, recorder(delivered, 1)))
        wait_for(lambda: polls.count >= 2)
        assert delivered == []
        second.close()
        wait_for(lambda: len(delivered) == base.FANOUT_SLICE * 2, 10)
        thread.join(10)
        assert free(group, 1), "the fan-out gave its slot back"
        assert not free(group, 0)
    finally:
        first.close()
        second.close()
