"""Signals as exceptions for the archive commands, deferred where a file is created."""

from __future__ import annotations

import os
import signal

import pytest

from nbdvma.interrupts import Terminated, deferred, install


def signal_self(signum: int) -> None:
    """Send a signal to this process and run bytecodes until its handler has run."""
    os.kill(os.getpid(), signum)
    for _ in range(1000):
        pass


def under_install(signum: int) -> None:
    with install():
        signal_self(signum)


def test_sigterm_and_sigint_become_exceptions_and_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Terminated):
        under_install(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        under_install(signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_signal_inside_deferred_is_raised_when_the_block_ends() -> None:
    recorded: list[str] = []

    def create_and_register() -> None:
        with install():
            with deferred():
                signal_self(signal.SIGTERM)
                recorded.append("created")  # still runs: the signal waits
                with deferred():  # nested blocks: raised at the outermost end
                    signal_self(signal.SIGINT)
                recorded.append("registered")
            recorded.append("never")

    with pytest.raises(Terminated):  # the first signal that came
        create_and_register()
    assert recorded == ["created", "registered"]


def test_deferred_without_a_signal_changes_nothing() -> None:
    """A block without a signal ends quietly, and leaves nothing deferred: the next
    signal outside any block is raised at once, before the next statement."""
    recorded: list[str] = []

    def quiet_block_then_signal() -> None:
        with install():
            with deferred():
                recorded.append("body")
            recorded.append("after")
            signal_self(signal.SIGTERM)
            recorded.append("never")  # raised at the signal, not deferred

    with pytest.raises(Terminated):
        quiet_block_then_signal()
    assert recorded == ["body", "after"]
