"""Tests of nbdvma.qmp: a fake QMP peer over memory streams, then a real paused QEMU."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import QemuVm

from nbdvma.qmp import (
    QmpClient,
    QmpConnectionClosed,
    QmpError,
    QmpEvent,
    QmpEventOverflow,
    QmpTimeout,
)

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"},
        "capabilities": ["oob"],
    }
}


def event(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A QMP event message as QEMU sends it."""
    message: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
    }
    if data is not None:
        message["data"] = data
    return message


class FakeQemu:
    """The QEMU end of a memory stream pair, driven step by step by a test."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\r\n"
        await self.stream.send_all(data)

    async def receive(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some()
            assert data, "client closed the stream"
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    async def handshake(self) -> None:
        await self.send(GREETING)
        request = await self.receive()
        assert request["execute"] == "qmp_capabilities"
        assert "arguments" not in request
        await self.send({"return": {}, "id": request["id"]})


async def run_with_fake(test: Callable[[QmpClient, FakeQemu], Any], **connect_kwargs: Any) -> None:
    """Connect a client to a FakeQemu, run ``await test(qmp, fake)``, then close."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    fake = FakeQemu(server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.handshake)
        async with QmpClient.over_stream(client_stream, **connect_kwargs) as qmp:
            await test(qmp, fake)


# -- a fake peer ----------------------------------------------------------------------------


async def test_greeting_and_version() -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        assert qmp.version == "7.2.22"
        assert qmp.greeting["capabilities"] == ["oob"]
        assert not qmp.closed

    await run_with_fake(check)


async def test_interleaved_answers_and_events() -> None:
    """Answers come out of order with events between them; each reaches its caller."""

    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        events = qmp.events()
        results: dict[str, Any] = {}

        async def call(name: str) -> None:
            results[name] = await qmp.execute(name, {"who": name}, timeout=5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "first")
            first = await fake.receive()
            nursery.start_soon(call, "second")
            second = await fake.receive()
            assert first["arguments"] == {"who": "first"}
            assert first["id"] != second["id"]
            await fake.send(event("ONE", {"n": 1}))
            await fake.send({"return": {"answer": 2}, "id": second["id"]})
            await fake.send(event("TWO", {"n": 2}))
            await fake.send({"return": [1], "id": first["id"]})
        assert results == {"first": [1], "second": {"answer": 2}}
        one = await events.wait(timeout=1)
        assert (one.name, one.data, one.timestamp) == ("ONE", {"n": 1}, 1700000000.25)
        two = await events.wait("TWO", timeout=1)
        assert two.seq == one.seq + 1

    await run_with_fake(check)


async def test_lines_split_at_every_byte() -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        events = qmp.events()
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                request = await fake.receive()
                data = (
                    json.dumps(event("X")).encode()
                    + b"\r\n\r\n"
                    + json.dumps({"return": {"ok": True}, "id": request["id"]}).encode()
                    + b"\r\n"
                )
                for i in range(len(data)):
                    await fake.send(data[i : i + 1])

            nursery.start_soon(answer)
            assert await qmp.execute("query-x", timeout=5) == {"ok": True}
        assert (await events.wait(timeout=1)).name == "X"

    await run_with_fake(check)


async def test_error_fields() -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        async def answer() -> None:
            request = await fake.receive()
            error = {"class": "DeviceNotFound", "desc": "Device 'x' not found"}
            await fake.send({"error": error, "id": request["id"]})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            with pytest.raises(QmpError) as info:
                await qmp.execute("block-job-cancel", {"device": "x"}, timeout=5)
        assert info.value.error_class == "DeviceNotFound"
        assert info.value.desc == "Device 'x' not found"
        assert info.value.command == "block-job-cancel"
        assert str(info.value) == "block-job-cancel: DeviceNotFound: Device 'x' not found"

    await run_with_fake(check)


async def test_error_without_id_fails_every_pending_command() -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        failures: list[str] = []

        async def call(name: str) -> None:
            try:
                await qmp.execute(name, timeout=5)
            except QmpError as exc:
                failures.append(f"{exc.command} {exc.error_class}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "a")
            await fake.receive()
            nursery.start_soon(call, "b")
            await fake.receive()
            await fake.send({"error": {"class": "GenericError", "desc": "JSON parse error"}})
        assert sorted(failures) == ["a GenericError", "b GenericError"]

    await run_with_fake(check)


async def test_event_before_wait_is_not_lost() -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        mark = qmp.event_mark()
        events = qmp.events()
        await fake.send(event("STOP"))
        await fake.send(event("BLOCK_JOB_COMPLETED", {"device": "bk0", "len": 5}))
        # Let the reader take both in before anyone waits.
        await trio.testing.wait_all_tasks_blocked()
        done = await events.wait("BLOCK_JOB_COMPLETED", match={"device": "bk0"}, timeout=1)
        assert done.data["len"] == 5
        again = await qmp.wait_event("STOP", since=mark, timeout=1)
        assert again.seq == mark
        assert events.pending() == []

    await run_with_fake(check)


async def test_wait_event_without_since_sees_only_new_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        await fake.send(event("STOP"))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(QmpTimeout, match="no QMP event STOP"):
            await qmp.wait_event("STOP", timeout=10)

    await run_with_fake(check)


async def test_match_by_names_nested_mapping_and_predicate() -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        events = qmp.events()
        await fake.send(event("JOB_STATUS_CHANGE", {"id": "bk0", "status": "running"}))
        await fake.send(event("BLOCK_JOB_ERROR", {"device": "bk1", "info": {"op": "write"}}))
        await fake.send(event("BLOCK_JOB_COMPLETED", {"device": "bk0"}))
        await fake.send(event("MIGRATION", {"status": "completed"}))
        first = await qmp.wait_event(
            ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"),
            match={"info": {"op": "write"}},
            since=events.cursor,
            timeout=1,
        )
        assert first.data["device"] == "bk1"

        def completed(e: QmpEvent) -> bool:
            return e.data.get("status") == "completed"

        migration = await events.wait(match=completed, timeout=1)
        assert migration.name == "MIGRATION"
        # The cursor moved past the events it skipped over.
        assert events.pending() == []

    await run_with_fake(check)


async def test_lagging_cursor_overflows_loudly() -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        events = qmp.events()
        for i in range(3):
            await fake.send(event("E", {"i": i}))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(QmpEventOverflow, match="dropped"):
            await events.wait(timeout=1)
        recent = qmp.events()
        recent.cursor = qmp.event_mark() - 2
        assert [e.data["i"] for e in recent.pending()] == [1, 2]

    await run_with_fake(check, event_buffer=2)


async def test_command_timeout_then_late_answer_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        with pytest.raises(QmpTimeout, match="no answer to QMP slow within 3 s"):
            await qmp.execute("slow", timeout=3)
        slow = await fake.receive()
        await fake.send({"return": "late", "id": slow["id"]})

        async def answer() -> None:
            request = await fake.receive()
            await fake.send({"return": "fresh", "id": request["id"]})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            assert await qmp.execute("quick", timeout=3) == "fresh"

    await run_with_fake(check)


async def test_peer_closing_wakes_every_waiter() -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        outcomes: list[str] = []

        async def wait_for_event() -> None:
            with pytest.raises(QmpConnectionClosed, match="QEMU closed the QMP connection"):
                await qmp.wait_event("NEVER", timeout=10)
            outcomes.append("event")

        async def wait_for_answer() -> None:
            with pytest.raises(QmpConnectionClosed):
                await qmp.execute("query-status", timeout=10)
            outcomes.append("execute")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_event)
            nursery.start_soon(wait_for_answer)
            await fake.receive()
            await fake.send(event("SHUTDOWN"))
            await fake.stream.aclose()
        assert sorted(outcomes) == ["event", "execute"]
        assert qmp.closed
        with pytest.raises(QmpConnectionClosed):
            await qmp.execute("query-status", timeout=1)

    await run_with_fake(check)


async def test_buffered_event_still_found_after_close() -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        events = qmp.events()
        await fake.send(event("SHUTDOWN", {"guest": False}))
        await fake.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert qmp.closed
        assert (await events.wait("SHUTDOWN", timeout=1)).data == {"guest": False}
        with pytest.raises(QmpConnectionClosed):
            await events.wait("SHUTDOWN", timeout=1)

    await run_with_fake(check)


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"{not json\n", "invalid JSON"),
        (b"[1, 2]\n", "non-object"),
        (b'{"surprise": 1}\n', "unexpected QMP message"),
        (b'{"event": 5}\n', "malformed QMP event"),
        (b'{"error": "x", "id": 0}\n', "malformed QMP error"),
    ],
)
async def test_garbage_from_peer_closes_the_client(garbage: bytes, reason: str) -> None:
    async def check(qmp: QmpClient, fake: FakeQemu) -> None:
        await fake.send(garbage)
        with pytest.raises(QmpConnectionClosed, match=reason):
            await qmp.wait_event("ANY", timeout=5)
        assert qmp.closed

    await run_with_fake(check)


async def test_bad_greeting_is_refused() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await server_stream.send_all(b'{"hello": 1}\n')
    with pytest.raises(QmpConnectionClosed, match="not a QMP greeting"):
        async with QmpClient.over_stream(client_stream, timeout=5):
            pytest.fail("connected")


async def test_silent_peer_times_out(autojump_clock: trio.testing.MockClock) -> None:
    client_stream, _server_stream = trio.testing.memory_stream_pair()
    with pytest.raises(QmpTimeout, match="negotiation"):
        async with QmpClient.over_stream(client_stream, timeout=2):
            pytest.fail("connected")


async def test_exception_in_body_is_not_wrapped() -> None:
    """The caller's exception comes out as itself, not in an ExceptionGroup."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    # Greeting and the answer to qmp_capabilities (the first id is 0), sent up front.
    await server_stream.send_all(json.dumps(GREETING).encode() + b'\n{"return": {}, "id": 0}\n')
    with pytest.raises(KeyError, match="mine"):
        async with QmpClient.over_stream(client_stream, timeout=5):
            raise KeyError("mine")


# -- a real QEMU ----------------------------------------------------------------------------

MIB = 1024 * 1024


@pytest.fixture
def two_disks(raw_image: Callable[..., Path]) -> list[Path]:
    """Two raw disks: 1 MiB + 4 KiB (not a multiple of 64 KiB) and 3 MiB."""
    return [
        raw_image("a.raw", MIB + 4096, {0: b"\xab" * 65536}),
        raw_image("b.raw", 3 * MIB, {MIB: b"\xcd" * 4096}),
    ]


@pytest.mark.interop
@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_real_qemu_status_and_block_devices(
    qemu_vm: Callable[..., QemuVm], two_disks: list[Path], transport: str
) -> None:
    vm = qemu_vm(two_disks, qmp=transport)
    assert vm.qmp_address.startswith(f"{transport}:")
    async with QmpClient.connect(vm.qmp_address) as qmp:
        assert qmp.version.startswith("7.")
        status = await qmp.execute("query-status")
        assert status["status"] == "prelaunch"
        assert status["running"] is False
        blocks = await qmp.execute("query-block")
        by_node = {b["inserted"]["node-name"]: b for b in blocks if "inserted" in b}
        for disk in vm.disks:
            block = by_node[disk.node_name]
            assert block["qdev"] == f"/machine/peripheral/{disk.device_id}/virtio-backend"
            assert block["inserted"]["image"]["virtual-size"] == disk.size
        assert [d.size for d in vm.disks] == [MIB + 4096, 3 * MIB]


@pytest.mark.interop
async def test_real_qemu_concurrent_commands(
    qemu_vm: Callable[..., QemuVm], two_disks: list[Path]
) -> None:
    vm = qemu_vm(two_disks)
    results: dict[int, Any] = {}
    async with QmpClient.connect(vm.qmp_address) as qmp:

        async def call(i: int) -> None:
            command = ("query-status", "query-block", "query-name", "query-version")[i % 4]
            results[i] = (command, await qmp.execute(command))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(call, i)
    assert len(results) == 20
    for command, result in results.values():
        if command == "query-status":
            assert result["status"] == "prelaunch"
        elif command == "query-block":
            assert isinstance(result, list)
        elif command == "query-version":
            assert result["qemu"]["major"] == 7


@pytest.mark.interop
async def test_real_qemu_error_classes(
    qemu_vm: Callable[..., QemuVm], two_disks: list[Path]
) -> None:
    vm = qemu_vm(two_disks)
    async with QmpClient.connect(vm.qmp_address) as qmp:
        with pytest.raises(QmpError) as info:
            await qmp.execute("device_add", {"driver": "no-such-device", "id": "x"})
        assert info.value.error_class == "GenericError"
        assert "no-such-device" in info.value.desc
        with pytest.raises(QmpError) as info:
            await qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        with pytest.raises(QmpError) as info:
            await qmp.execute("block-job-cancel", {"device": "nothing"})
        assert info.value.error_class == "DeviceNotActive"
        # The connection is still usable after errors.
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"


@pytest.mark.interop
async def test_real_qemu_stop_and_cont_events(
    qemu_vm: Callable[..., QemuVm], two_disks: list[Path]
) -> None:
    vm = qemu_vm(two_disks)
    async with QmpClient.connect(vm.qmp_address) as qmp:
        events = qmp.events()
        await qmp.execute("cont")
        resume = await events.wait("RESUME", timeout=10)
        assert resume.timestamp is not None
        assert (await qmp.execute("query-status"))["running"] is True
        mark = qmp.event_mark()
        await qmp.execute("stop")
        # QEMU emits STOP before its answer to stop: the mark still finds it.
        stop = await qmp.wait_event("STOP", since=mark, timeout=10)
        assert stop.seq > resume.seq
        assert (await qmp.execute("query-status"))["status"] == "paused"


@pytest.mark.interop
async def test_real_qemu_killed_wakes_waiters(
    qemu_vm: Callable[..., QemuVm], two_disks: list[Path]
) -> None:
    vm = qemu_vm(two_disks, qmp="tcp")
    async with QmpClient.connect(vm.qmp_address) as qmp:
        closed: list[str] = []

        async def waiter() -> None:
            with pytest.raises(QmpConnectionClosed) as info:
                await qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
            closed.append(str(info.value))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await trio.to_thread.run_sync(vm.kill)
        assert len(closed) == 2
        assert all("closed" in reason or "failed" in reason for reason in closed)
        with pytest.raises(QmpConnectionClosed):
            await qmp.execute("query-status")


@pytest.mark.interop
async def test_real_qemu_quit_closes_connection(
    qemu_vm: Callable[..., QemuVm], two_disks: list[Path]
) -> None:
    vm = qemu_vm(two_disks)
    async with QmpClient.connect(vm.qmp_address) as qmp:
        events, seen = qmp.events(), qmp.events()
        # QEMU may exit before it flushes its answer to quit (and the SHUTDOWN event):
        # then the client reports the closed connection instead.
        with contextlib.suppress(QmpConnectionClosed):
            assert await qmp.execute("quit") == {}
        with pytest.raises(QmpConnectionClosed):
            await events.wait("NEVER", timeout=10)
        assert qmp.closed
        for shutdown in seen.pending():
            assert (shutdown.name, shutdown.data["reason"]) == ("SHUTDOWN", "host-qmp-quit")
    assert await trio.to_thread.run_sync(vm.process.wait) == 0


@pytest.mark.interop
async def test_real_qemu_second_client_times_out_with_a_hint(
    qemu_vm: Callable[..., QemuVm], two_disks: list[Path]
) -> None:
    vm = qemu_vm(two_disks)
    async with QmpClient.connect(vm.qmp_address) as qmp:
        with pytest.raises(QmpTimeout, match="another one connected"):
            async with QmpClient.connect(vm.qmp_address, timeout=0.5):
                pytest.fail("QEMU greeted a second client")
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
