"""The thread count follows the load at every stage's start (gain_cli.threads.threads_for_stage)."""

import pytest

from gain_cli import threads


@pytest.fixture
def governed(monkeypatch):
    """A process whose threads the start-up choice sets (no OMP_NUM_THREADS, no launcher), started on idle cores:
    its pool spins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(threads, "_CHOSEN", [threads.ThreadChoice("ACTIVE", 2, "test")])


@pytest.mark.parametrize("current, cores, load, expected", [
    (2, 2, 2.1, None),        # load 2.1 is this run's own 2 threads: nothing else runs, keep 2
    (2, 2, 3.0, 1),           # one other busy process besides our 2 threads: one core left
    (1, 2, 1.2, 2),           # the others left (load ≈ our 1 thread): back to every core
    (1, 2, 3.0, None),        # two others besides our 1 thread: stay at the one (at least one)
    (4, 8, 6.0, 6),           # 2 others on 8 cores: 6
])
def test_the_stage_start_follows_the_others_load(governed, current, cores, load, expected):
    change = threads.threads_for_stage(current, cores, load)
    if expected is None:
        assert change is None
    else:
        assert change[0] == expected
        assert change[1].startswith(f"CPU threads: {current} → {expected} (load {load:.1f}")


def test_a_sleeping_pool_keeps_every_core(governed, monkeypatch):
    monkeypatch.setattr(threads, "_CHOSEN", [threads.ThreadChoice("PASSIVE", 2, "test")])
    assert threads.threads_for_stage(2, 2, 5.0) is None  # PASSIVE: measured faster with every core under load
    assert threads.threads_for_stage(1, 2, 5.0)[0] == 2


def test_a_fixed_count_is_left_alone(governed, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's
    assert threads.threads_for_stage(2, 2, 5.0) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("RANK", "0")  # a launched process: its launcher shares the cores
    assert threads.threads_for_stage(2, 2, 5.0) is None
