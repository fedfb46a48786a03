"""A small trio client for the QEMU Machine Protocol (QMP).

Why not a library: ``qemu.qmp`` (QEMU's own, formerly ``aqmp``) is built on asyncio
event loops and protocols, and the older ``qmp`` package on blocking sockets; neither
runs inside trio without a bridge thread or ``trio-asyncio``.  QMP is JSON lines plus
a few rules, so a client of our own is smaller than the glue.

Theory of operation
-------------------
QMP is one JSON object per line in both directions.  On connect QEMU sends a greeting
(``{"QMP": {...}}``) and waits in *negotiation mode* until the client sends
``qmp_capabilities``; from then on the client sends commands
``{"execute": NAME, "arguments": {...}, "id": N}`` and QEMU answers each with
``{"return": ..., "id": N}`` or ``{"error": {"class": ..., "desc": ...}, "id": N}``,
in between *events* (``{"event": NAME, "data": {...}, "timestamp": {...}}``) that are
not answers to anything and may arrive at any moment, including before the answer to
the command that caused them (``stop`` emits ``STOP`` before its return).

:meth:`QmpClient.connect` owns a nursery with one background task, the reader, which
parses every line and dispatches it without awaiting anything:

* an answer wakes the :meth:`~QmpClient.execute` call waiting for its ``id`` (an answer
  whose caller gave up on a timeout is dropped);
* an event is appended to a bounded buffer with a sequence number, and every waiter is
  woken to look at it.

Event waiters hold a *cursor*, a sequence number: they see every buffered event from
there on, so an event that arrived before the wait began is not lost, as long as the
cursor was taken before it arrived.  Take it before the command that causes the event:

    events = qmp.events()                  # cursor: "from now on"
    await qmp.execute("stop")
    await events.wait("STOP", timeout=5)   # finds STOP even if it came first

When more events arrive than the buffer holds while a cursor lags behind, the cursor's
next wait raises :class:`QmpEventOverflow` instead of silently skipping events.

When the stream ends (QEMU exited or closed the socket) or QEMU sends something that
is not QMP, the client is *closed*: every waiting and future ``execute`` raises
:class:`QmpConnectionClosed`, and event waits raise it once the buffered events have
no match.  (``quit`` is the one command whose answer QEMU may never send: it can exit
before flushing it, and the caller then sees :class:`QmpConnectionClosed`.)  Every wait
has a deadline and raises :class:`QmpTimeout` when it passes.  The deadlines are
``timeout=`` parameters (against ruff's ASYNC109 advice) on purpose: a wait for QEMU
must not be left without one by a caller that forgot its own ``fail_after``.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from nbdvma.addresses import Address, open_stream
from nbdvma.errors import (
    QmpConnectError,
    QmpConnectionClosed,
    QmpError,
    QmpEventOverflow,
    QmpTimeout,
)

__all__ = [
    "EventMatch",
    "QmpClient",
    "QmpConnectError",
    "QmpConnectionClosed",
    "QmpError",
    "QmpEvent",
    "QmpEventOverflow",
    "QmpEvents",
    "QmpTimeout",
]

logger = logging.getLogger(__name__)

#: Longest line accepted from QEMU.  ``query-qmp-schema`` is the largest answer QEMU
#: gives (under 1 MiB for 7.2); anything far beyond is not a QMP peer.
MAX_LINE = 16 * 1024 * 1024

#: Events kept for cursors that have not looked at them yet.
DEFAULT_EVENT_BUFFER = 4096

#: Default deadline of one command, in seconds.
DEFAULT_COMMAND_TIMEOUT = 30.0

#: A filter on event data: a mapping whose items must all appear in ``event.data``
#: (nested mappings compared the same way), or a predicate on the whole event.
EventMatch = Mapping[str, Any] | Callable[["QmpEvent"], bool]


@attrs.frozen
class QmpEvent:
    """One asynchronous event from QEMU.

    Attributes:
        name: the event name, e.g. ``"STOP"``, ``"BLOCK_JOB_COMPLETED"``.
        data: the event's ``data`` member (empty when QEMU sent none).
        timestamp: QEMU's wall-clock timestamp in seconds, or ``None``.
        seq: the client's sequence number of the event (0 for the first one).
    """

    name: str
    data: Mapping[str, Any]
    timestamp: float | None
    seq: int

    def matches(self, names: str | Collection[str] | None, match: EventMatch | None) -> bool:
        """Whether the event has one of ``names`` (any if ``None``) and passes ``match``."""
        if names is not None:
            if isinstance(names, str):
                if self.name != names:
                    return False
            elif self.name not in names:
                return False
        if match is None:
            return True
        if callable(match):
            return bool(match(self))
        return _contains(self.data, match)


def _contains(data: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    for key, want in match.items():
        if key not in data:
            return False
        have = data[key]
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            if not _contains(have, want):
                return False
        elif have != want:
            return False
    return True


@attrs.define(eq=False)
class _Pending:
    """One command waiting for its answer."""

    command: str
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class QmpEvents:
    """A cursor into the client's events: each :meth:`wait` sees the events from the
    cursor on and moves the cursor past the one it returns.

    Made by :meth:`QmpClient.events`.
    """

    def __init__(self, client: QmpClient, cursor: int) -> None:
        self._client = client
        #: Sequence number of the next event this cursor will look at.
        self.cursor = cursor

    async def wait(
        self,
        name: str | Collection[str] | None = None,
        *,
        match: EventMatch | None = None,
        timeout: float,  # noqa: ASYNC109 (see the module docstring)
    ) -> QmpEvent:
        """Wait for the next event (from the cursor on) named ``name`` that passes ``match``.

        Events that do not match are passed over for good: the cursor moves past them.

        Args:
            name: an event name, a collection of names (any of them), or ``None`` (any).
            match: a subset of the event data, or a predicate (see :data:`EventMatch`).
            timeout: deadline in seconds.

        Returns:
            The matching event.

        Raises:
            QmpTimeout: no such event before the deadline.
            QmpConnectionClosed: the connection closed and no buffered event matches.
            QmpEventOverflow: events after the cursor were dropped from the buffer.
        """
        try:
            with trio.fail_after(timeout):
                return await self._wait(name, match)
        except trio.TooSlowError:
            what = name if isinstance(name, str | None) else "/".join(sorted(name))
            raise QmpTimeout(
                f"no QMP event {what or '(any)'} matching {match!r} within {timeout} s"
            ) from None

    async def _wait(
        self, names: str | Collection[str] | None, match: EventMatch | None
    ) -> QmpEvent:
        client = self._client
        while True:
            changed = client._events_changed
            for event in client._buffered_from(self.cursor):
                self.cursor = event.seq + 1
                if event.matches(names, match):
                    return event
            client._raise_if_closed()
            await changed.wait()

    def pending(self) -> list[QmpEvent]:
        """The buffered events from the cursor on, without moving it or waiting."""
        return list(self._client._buffered_from(self.cursor))


@attrs.define(eq=False)
class QmpClient:
    """A QMP connection.  Make one with :meth:`connect` or :meth:`over_stream`.

    Attributes:
        greeting: QEMU's greeting, the object under ``"QMP"`` (``version``,
            ``capabilities``).
    """

    _stream: trio.abc.Stream
    _event_buffer: int = DEFAULT_EVENT_BUFFER
    greeting: Mapping[str, Any] = attrs.field(init=False, factory=dict)
    _ids: itertools.count[int] = attrs.field(init=False, factory=itertools.count)
    _pending: dict[int, _Pending] = attrs.field(init=False, factory=dict)
    _send_lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _events: collections.deque[QmpEvent] = attrs.field(init=False)
    _next_seq: int = attrs.field(init=False, default=0)
    _events_changed: trio.Event = attrs.field(init=False, factory=trio.Event)
    #: Why the connection closed; ``None`` while it is open.
    _closed_reason: str | None = attrs.field(init=False, default=None)
    _buffer: bytearray = attrs.field(init=False, factory=bytearray)
    _scanned: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._events = collections.deque(maxlen=self._event_buffer)

    # -- opening -----------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        address: Address | str,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109 (see the module docstring)
        event_buffer: int = DEFAULT_EVENT_BUFFER,
    ) -> AsyncIterator[QmpClient]:
        """Connect to QEMU's QMP socket and negotiate capabilities.

        Use as ``async with QmpClient.connect("unix:/run/qmp.sock") as qmp: ...``.
        Leaving the block closes the connection.

        Args:
            address: ``unix:PATH``, ``tcp:HOST:PORT`` or a parsed address.
            timeout: deadline in seconds for connecting, the greeting and
                ``qmp_capabilities``.
            event_buffer: how many events to keep for lagging cursors.

        Raises:
            QmpConnectError: the socket could not be connected.
            QmpConnectionClosed: QEMU closed the connection or did not greet in QMP.
            QmpTimeout: the greeting or the negotiation took longer than ``timeout``.
        """
        try:
            with trio.fail_after(timeout):
                stream = await open_stream(address)
        except trio.TooSlowError:
            raise QmpTimeout(f"connecting to QMP at {address} took over {timeout} s") from None
        except OSError as exc:
            # "No such file or directory" alone does not say which: name the socket.
            raise QmpConnectError(
                f"QMP {address}: {_reason(exc)} (is QEMU running with -qmp {address},server=on?)"
            ) from None
        async with cls.over_stream(stream, timeout=timeout, event_buffer=event_buffer) as client:
            yield client

    @classmethod
    @asynccontextmanager
    async def over_stream(
        cls,
        stream: trio.abc.Stream,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109 (see the module docstring)
        event_buffer: int = DEFAULT_EVENT_BUFFER,
    ) -> AsyncIterator[QmpClient]:
        """Speak QMP over an already connected stream (which the client then owns and
        closes).  Same as :meth:`connect` otherwise; tests use it with memory streams."""
        if event_buffer < 1:
            raise ValueError("event_buffer must be at least 1")
        client = cls(stream, event_buffer)
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await client._negotiate(nursery, timeout)
                    yield client
                except BaseException as exc:
                    # Re-raised below, outside the nursery, so that the caller sees its
                    # own exception rather than an ExceptionGroup wrapping it.
                    body_error = exc
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            client._close("the QMP client was closed")
            await trio.aclose_forcefully(stream)
        if body_error is not None:
            raise body_error

    async def _negotiate(self, nursery: trio.Nursery, limit: float) -> None:
        try:
            with trio.fail_after(limit):
                message = await self._read_message()
                if message is None:
                    raise QmpConnectionClosed("QEMU closed the QMP connection before greeting")
                greeting = message.get("QMP")
                if not isinstance(greeting, dict):
                    raise QmpConnectionClosed(f"not a QMP greeting: {_abbrev(message)}")
                self.greeting = greeting
                nursery.start_soon(self._reader)
                await self.execute("qmp_capabilities", timeout=math.inf)
        except trio.TooSlowError:
            raise QmpTimeout(
                f"QMP negotiation took over {limit} s (QEMU serves one QMP client at a time:"
                " is another one connected?)"
            ) from None

    # -- state -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (see :class:`QmpConnectionClosed`)."""
        return self._closed_reason is not None

    @property
    def version(self) -> str:
        """QEMU's version from the greeting, e.g. ``"7.2.22"``."""
        qemu = self.greeting.get("version", {}).get("qemu", {})
        return f"{qemu.get('major', '?')}.{qemu.get('minor', '?')}.{qemu.get('micro', '?')}"

    # -- commands ----------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float = DEFAULT_COMMAND_TIMEOUT,  # noqa: ASYNC109 (see the module docstring)
    ) -> Any:
        """Run a QMP command and return its ``return`` value.

        Several calls may run concurrently; answers are matched by ``id``.

        Args:
            command: the command name, e.g. ``"query-status"``.
            args: the command's arguments, or ``None`` for none.
            timeout: deadline in seconds for sending and the answer.

        Returns:
            The decoded ``return`` member (usually a dict; a list for ``query-*`` lists).

        Raises:
            QmpError: QEMU answered with an error.
            QmpConnectionClosed: the connection is or became closed before the answer.
            QmpTimeout: no answer before the deadline (a late answer is dropped).
        """
        self._raise_if_closed()
        msg_id = next(self._ids)
        message: dict[str, Any] = {"execute": command, "id": msg_id}
        if args is not None:
            message["arguments"] = dict(args)
        pending = _Pending(command)
        self._pending[msg_id] = pending
        try:
            with trio.fail_after(timeout):
                await self._send(message)
                await pending.done.wait()
        except trio.TooSlowError:
            raise QmpTimeout(f"no answer to QMP {command} within {timeout} s") from None
        finally:
            self._pending.pop(msg_id, None)
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def _send(self, message: Mapping[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        logger.debug("QMP > %s", data[:200])
        async with self._send_lock:
            self._raise_if_closed()
            completed = False
            try:
                await self._stream.send_all(data)
                completed = True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._close(f"sending to QEMU failed: {exc!r}")
                raise QmpConnectionClosed(f"sending to QEMU failed: {exc!r}") from exc
            finally:
                if not completed and self._closed_reason is None:
                    # Cancelled mid-send: part of a line may be out, so nothing sent
                    # after it could be parsed.  Give up on the connection.
                    self._close("a QMP send was interrupted")

    # -- events ------------------------------------------------------------------------

    def events(self) -> QmpEvents:
        """A cursor that sees every event arriving from now on (see :class:`QmpEvents`).

        Take it before the command whose events you want, so none can be missed.
        """
        return QmpEvents(self, self._next_seq)

    def event_mark(self) -> int:
        """The sequence number the next event will get; a ``since`` for :meth:`wait_event`."""
        return self._next_seq

    async def wait_event(
        self,
        name: str | Collection[str] | None = None,
        *,
        match: EventMatch | None = None,
        timeout: float,  # noqa: ASYNC109 (see the module docstring)
        since: int | None = None,
    ) -> QmpEvent:
        """Wait for an event named ``name`` that passes ``match``.

        Args:
            name: an event name, a collection of names (any of them), or ``None`` (any).
            match: a subset of the event data, or a predicate (see :data:`EventMatch`).
            timeout: deadline in seconds.
            since: look at buffered events from this sequence number on (from
                :meth:`event_mark`, or an earlier event's ``seq``); ``None`` means only
                events arriving after this call.

        Returns:
            The first matching event.

        Raises:
            QmpTimeout, QmpConnectionClosed, QmpEventOverflow: as :meth:`QmpEvents.wait`.
        """
        cursor = QmpEvents(self, self._next_seq if since is None else since)
        return await cursor.wait(name, match=match, timeout=timeout)

    def _buffered_from(self, cursor: int) -> list[QmpEvent]:
        if not self._events:
            if cursor < self._next_seq:
                raise QmpEventOverflow(f"events {cursor}..{self._next_seq - 1} were dropped")
            return []
        first = self._events[0].seq
        if cursor < first:
            raise QmpEventOverflow(
                f"events {cursor}..{first - 1} were dropped from the buffer of"
                f" {self._event_buffer} before they were waited for"
            )
        return list(itertools.islice(self._events, cursor - first, None))

    def _add_event(self, message: Mapping[str, Any]) -> None:
        name = message["event"]
        data = message.get("data", {})
        if not isinstance(name, str) or not isinstance(data, dict):
            raise QmpConnectionClosed(f"malformed QMP event: {_abbrev(message)}")
        stamp = message.get("timestamp")
        timestamp: float | None = None
        if isinstance(stamp, dict):
            seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
            if isinstance(seconds, int) and isinstance(micros, int):
                timestamp = seconds + micros / 1e6
        event = QmpEvent(name, data, timestamp, self._next_seq)
        self._next_seq += 1
        self._events.append(event)
        logger.debug("QMP event %s %s", name, _abbrev(data))
        self._wake_event_waiters()

    def _wake_event_waiters(self) -> None:
        self._events_changed.set()
        self._events_changed = trio.Event()

    # -- reading ------------------------------------------------------------------------

    async def _reader(self) -> None:
        """The background task: dispatch every message until the stream ends."""
        try:
            while True:
                message = await self._read_message()
                if message is None:
                    self._close("QEMU closed the QMP connection")
                    return
                self._dispatch(message)
        except QmpConnectionClosed as exc:
            self._close(str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._close(f"reading from QEMU failed: {exc!r}")

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "event" in message:
            self._add_event(message)
            return
        if "return" in message:
            error = None
        elif "error" in message:
            err = message["error"]
            if not isinstance(err, dict):
                raise QmpConnectionClosed(f"malformed QMP error: {_abbrev(message)}")
            error = (str(err.get("class", "GenericError")), str(err.get("desc", "")))
        else:
            raise QmpConnectionClosed(f"unexpected QMP message: {_abbrev(message)}")
        msg_id = message.get("id")
        if msg_id is None and error is not None:
            # QEMU answers without an id only when it could not parse a command, so it
            # cannot be told which one: fail them all.
            for waiting in self._pending.values():
                waiting.error = QmpError(*error, waiting.command)
                waiting.done.set()
            return
        pending = self._pending.get(msg_id) if isinstance(msg_id, int) else None
        if pending is None:
            logger.debug("dropping QMP answer to id %r (timed out or unknown)", msg_id)
            return
        if error is not None:
            pending.error = QmpError(*error, pending.command)
        else:
            pending.result = message["return"]
        pending.done.set()

    async def _read_message(self) -> dict[str, Any] | None:
        """The next JSON object from the stream, or ``None`` at a clean end of stream."""
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                self._scanned = 0
                if not line.strip():
                    continue
                return _parse_line_untrusted(line)
            self._scanned = len(self._buffer)
            if len(self._buffer) > MAX_LINE:
                raise QmpConnectionClosed(f"QMP line longer than {MAX_LINE} bytes")
            data = await self._stream.receive_some(65536)
            if not data:
                if self._buffer.strip():
                    raise QmpConnectionClosed("QMP connection closed in the middle of a line")
                return None
            self._buffer += data

    # -- closing ------------------------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._closed_reason is not None:
            raise QmpConnectionClosed(self._closed_reason)

    def _close(self, reason: str) -> None:
        """Mark the connection closed and wake every waiter with the reason."""
        if self._closed_reason is not None:
            return
        logger.debug("QMP connection closed: %s", reason)
        self._closed_reason = reason
        for pending in self._pending.values():
            pending.error = QmpConnectionClosed(reason)
            pending.done.set()
        self._wake_event_waiters()


def _parse_line_untrusted(line: bytes) -> dict[str, Any]:
    """Decode one line from QEMU; raise only :class:`QmpConnectionClosed`."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise QmpConnectionClosed(f"QEMU sent invalid JSON: {_abbrev(line)}") from exc
    if not isinstance(message, dict):
        raise QmpConnectionClosed(f"QEMU sent a non-object: {_abbrev(line)}")
    logger.debug("QMP < %s", _abbrev(line))
    return message


def _abbrev(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    """The system's words for a failed connect: trio's TCP connect reports "all attempts
    to connect ... failed" and keeps each attempt's error (refused...) as the cause."""
    cause = exc
    while True:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        elif cause.__cause__ is not None:
            cause = cause.__cause__
        else:
            return str(exc)
