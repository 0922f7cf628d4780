"""The ServerApp's exchange (transport.send_and_receive): Flower's public push/pull, with a wait for
replies that adds at most max(PULL_MIN_S, PULL_SHARE x the wait) to a round, and a timeout kept."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest

from ted_fl.federated import transport as S


class Clock:
    """A fake monotonic clock that `time.sleep` advances: the test takes no wall time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class Grid:
    """Replies to message i become available at time ready[i] (on the fake clock)."""

    def __init__(self, clock: Clock, ready: list[float]) -> None:
        self.clock, self.ready, self.pulls = clock, ready, 0

    def push_messages(self, messages: Any) -> list[str]:
        return [f"m{i}" for i in range(len(list(messages)))]

    def pull_messages(self, ids: Any) -> list[Any]:
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if self.clock.now >= self.ready[int(i[1:])]]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(S.time, "monotonic", c.monotonic)
    monkeypatch.setattr(S.time, "sleep", c.sleep)
    return c


@pytest.mark.parametrize("arrival", [0.0005, 0.05, 0.3, 2.0, 30.0])
def test_a_reply_is_seen_soon_after_it_arrives(clock: Clock, arrival: float) -> None:
    grid = Grid(clock, [arrival])
    out = S.send_and_receive(grid, [object()], timeout=3600)  # type: ignore[arg-type, list-item]
    assert [m.metadata.reply_to_message_id for m in out] == ["m0"]
    late = clock.now - arrival
    assert 0 <= late <= max(S.PULL_MIN_S, S.PULL_SHARE * clock.now) + 1e-12
    assert late < 0.1  # Flower's own send_and_receive: up to pull_interval = 0.1 s late
    assert all(S.PULL_MIN_S - 1e-12 <= s <= S.PULL_MAX_S for s in clock.sleeps)
    # pulls: PULL_MIN_S apart up to t0, then with the log of the wait up to t1, then PULL_MAX_S apart
    # (at 2 ms throughout, 30 s would take 15000 pulls)
    t0, t1 = S.PULL_MIN_S / S.PULL_SHARE, S.PULL_MAX_S / S.PULL_SHARE
    bound = 3 + min(arrival, t0) / S.PULL_MIN_S + max(0.0, math.log(min(arrival, t1) / t0)) / math.log1p(S.PULL_SHARE) \
        + max(0.0, arrival - t1) / S.PULL_MAX_S
    assert grid.pulls <= bound


def test_every_reply_is_waited_for(clock: Clock) -> None:
    grid = Grid(clock, [0.01, 0.5, 0.2])
    out = S.send_and_receive(grid, [object()] * 3, timeout=3600)  # type: ignore[arg-type, list-item]
    assert sorted(m.metadata.reply_to_message_id for m in out) == ["m0", "m1", "m2"]
    assert 0.5 <= clock.now <= 0.5 + S.PULL_SHARE * clock.now


def test_the_timeout_returns_what_came(clock: Clock) -> None:
    grid = Grid(clock, [0.01, 1e9])
    out = S.send_and_receive(grid, [object()] * 2, timeout=5.0)  # type: ignore[arg-type, list-item]
    assert [m.metadata.reply_to_message_id for m in out] == ["m0"]
    assert clock.now == pytest.approx(5.0)
