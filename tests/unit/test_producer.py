"""Producer and AsyncProducer against real sockets owned by the test (no router): fire-mode
close delivers what ZeroMQ still queues, the window is exact with concurrent senders, and
adaptive batching never holds back an event sent to an idle producer."""

from __future__ import annotations

import asyncio
import select
import subprocess
import sys
import textwrap
import threading
import time

import msgspec
import pytest
import zmq

import nexus.producer.client as producer_module
from nexus import AsyncProducer, PeerError, Producer
from nexus.protocol.wire import ProducerReply, batch_decoder, encoder
from nexus.testing import wait_for

REPO = str(__import__("pathlib").Path(__file__).resolve().parents[2])


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def bind(ctx: zmq.Context, kind: int, endpoint: str, rcvhwm: int = 1000) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.bind(endpoint)
    return sock


def receive_events(sock: zmq.Socket, count: int, timeout: float) -> list[bytes]:
    """Read ProducerBatch messages from a PULL until `count` events came or `timeout` ran out."""
    events: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000) + 1):
            break
        events.extend(bytes(e) for e in batch_decoder.decode(sock.recv()).events)
    return events


# -- fire mode: close() delivers the queue --------------------------------------------------
SENDER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from nexus import AsyncProducer, Producer
    endpoint, count, mode, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    pad = "x" * size
    if mode == "sync":
        p = Producer(endpoint, source="late", confirm=False)
        for i in range(count):
            p.send("test.late", {{"i": i, "pad": pad}})
        p.flush(30)
        print("handed", flush=True)
        p.close(30)
    else:
        async def main():
            p = AsyncProducer(endpoint, source="late", confirm=False)
            for i in range(count):
                await p.send("test.late", {{"i": i, "pad": pad}})
            await p.flush(30)
            print("handed", flush=True)
            await p.close(30)
        asyncio.run(main())
    print("closed", flush=True)
""")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fire_close_delivers_the_queue_to_a_router_that_reads_late(tmp_path, zctx, mode):
    """The benchmark's loss: a backed-up router, and the producer process exits right after
    close(). close() must wait until ZeroMQ handed every queued message over."""
    endpoint = f"ipc://{tmp_path}/ingest"
    pull = bind(zctx, zmq.PULL, endpoint, rcvhwm=1)  # takes almost nothing until we read
    # ~18 MB, far more than socket buffers, in few large events: they fit ZeroMQ's queue of
    # 100 messages however the producer batches them (a preempted caller sends small batches)
    count, size = 90, 200_000
    proc = subprocess.Popen(
        [sys.executable, "-c", SENDER.format(repo=REPO), endpoint, str(count), mode, str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "the producer never handed its events over"
        assert proc.stdout.readline().strip() == "handed"  # every event is in ZeroMQ's queue
        # the router is busy: it reads nothing until the producer exited, or for 1 s at most
        # (without the fix the process exits at once and the queue dies with it)
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        events: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(events) < count and time.monotonic() < deadline:
            # every receive has a timeout; once the producer exited, 2 s of silence is the end
            more = receive_events(pull, count - len(events), timeout=2)
            if not more and proc.poll() is not None:
                break
            events += more
        assert proc.wait(60) == 0
        assert proc.stdout.read().strip() == "closed"
    finally:
        proc.kill()
        proc.wait(10)
    assert len(events) == count


def test_fire_close_raises_when_the_router_never_takes_the_queue(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody"  # no router bound there
    p = Producer(endpoint, source="down", confirm=False)
    for i in range(10):
        p.send("test.down", {"i": i})
    p.flush(5)  # handed to ZeroMQ: that is all flush says
    start = time.monotonic()
    with pytest.raises(PeerError, match="dropped"):
        p.close(timeout=0.5)
    assert time.monotonic() - start < 5


def test_async_fire_close_raises_when_the_router_never_takes_the_queue(tmp_path):
    async def main():
        p = AsyncProducer(f"ipc://{tmp_path}/nobody", source="down", confirm=False)
        for i in range(10):
            await p.send("test.down", {"i": i})
        await p.flush(5)
        with pytest.raises(PeerError, match="dropped"):
            await p.close(timeout=0.5)

    asyncio.run(asyncio.wait_for(main(), 30))


LATE_READ_S = 6.5  # past the 5 s close() used to give the I/O thread


def _stuck(sock: zmq.Socket, held) -> bool:
    """A message is held and the socket found no room for it within 0.3 s: every queue
    on the way (both pipes, the kernel's buffers) is full, so it stays stuck until the
    reader reads. (Called under the producer's I/O lock: the socket is ours meanwhile.)"""
    return bool(held) and not sock.poll(300, zmq.POLLOUT)


def _late_reader(pull: zmq.Socket, got: list[bytes], stop: threading.Event) -> threading.Thread:
    """A backed-up router: reads nothing for LATE_READ_S, then everything (each receive
    with a timeout, until told to stop)."""

    def run() -> None:
        if stop.wait(LATE_READ_S):
            return
        while not stop.is_set():
            got.extend(receive_events(pull, 10**9, timeout=0.2))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_fire_close_waits_for_the_message_it_still_holds(tmp_path, zctx, monkeypatch):
    """The benchmark's lost tail (8, 142, 1,921 events in loaded runs): at close the
    producer still held a message the backed-up socket had no room for (flush had seen
    every event taken into a message). close() gave the I/O thread 5 s, then ended it with
    ETERM: that message was dropped and close() said nothing. Now close waits for it
    within its timeout, and raises naming the count if it cannot. (AsyncProducer's flush
    already waits until its sender handed every message over.)"""
    monkeypatch.setattr(producer_module, "FIRE_HWM", 1)  # the socket fills after a message or two
    endpoint = f"ipc://{tmp_path}/late"
    pull = bind(zctx, zmq.PULL, endpoint, rcvhwm=1)
    pad = "x" * 400_000
    got: list[bytes] = []
    stop = threading.Event()

    def sync_case() -> tuple[int, threading.Thread]:
        p = Producer(endpoint, source="late", confirm=False)
        sent = 0
        while sent < 100:
            p.send("test.late", {"i": sent, "pad": pad})
            sent += 1
            wait_for(p._outbox.idle, 10, 0.001, "the event taken into a message")
            with p._io_lock:
                if p._sock is not None and _stuck(p._sock, p._held):
                    break
        assert p._held, "never reached a held message"
        reader = _late_reader(pull, got, stop)
        p.close(timeout=30)
        return sent, reader

    try:
        sent, reader = sync_case()
        wait_for(lambda: len(got) >= sent, 30, 0.05, "every event at the reader")
    finally:
        stop.set()
    reader.join(10)
    assert len(got) == sent  # every event, the held one too; none twice


def test_fire_close_with_a_reading_router_is_quiet_and_quick(tmp_path, zctx):
    endpoint = f"ipc://{tmp_path}/ingest"
    pull = bind(zctx, zmq.PULL, endpoint)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.extend(receive_events(pull, 5000, 30)))
    reader.start()
    p = Producer(endpoint, source="ok", confirm=False)
    for i in range(5000):
        p.send("test.ok", {"i": i})
    start = time.monotonic()
    p.close(timeout=20)  # no PeerError: everything was taken
    assert time.monotonic() - start < 10
    reader.join(40)
    assert len(received) == 5000


# -- the window ---------------------------------------------------------------------------
def test_window_is_exact_with_concurrent_senders(tmp_path, zctx):
    """Confirm mode, a fake router that ACKs only when the test says so: the router never
    holds more than `window` unacked events, however many threads send."""
    endpoint = f"ipc://{tmp_path}/confirm"
    router = bind(zctx, zmq.ROUTER, endpoint)
    window, threads, per_thread = 50, 4, 60
    p = Producer(endpoint, source="win", confirm=True, window=window, ack_timeout=600)
    done = []
    lock = threading.Lock()

    def sender(t: int) -> None:
        for i in range(per_thread):
            p.send("test.win", {"t": t, "i": i})
            with lock:
                done.append((t, i))

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    received = acked = 0
    peer = None
    deadline = time.monotonic() + 60
    while acked < threads * per_thread:
        assert time.monotonic() < deadline, f"stuck at {received} received, {acked} acked"
        if router.poll(100):
            peer, raw = router.recv_multipart()
            batch = batch_decoder.decode(raw)
            assert batch.seq == received + 1  # nothing resent, nothing skipped
            received += len(batch.events)
            assert received - acked <= window, "the router holds more than the window"
            continue
        # the producer went quiet: it must be because the window is full
        if received - acked == window:
            with lock:
                assert len(done) == received  # every blocked send is still blocked
            assert p._outbox.in_flight() == window
        if received > acked:
            router.send_multipart([peer, encoder.encode(ProducerReply(ack=received))])
            acked = received
    for w in workers:
        w.join(30)
    assert len(done) == threads * per_thread
    p.flush(10)
    p.close(5)


def test_a_blocked_sender_is_released_when_the_producer_closes(tmp_path, zctx):
    endpoint = f"ipc://{tmp_path}/confirm"
    router = bind(zctx, zmq.ROUTER, endpoint)
    p = Producer(endpoint, source="win", confirm=True, window=3, ack_timeout=600)
    for i in range(3):
        p.send("test.win", {"i": i})
    outcome = []

    def blocked() -> None:
        try:
            p.send("test.win", {"i": 3})
            outcome.append("sent")
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(type(exc).__name__)

    t = threading.Thread(target=blocked)
    t.start()
    t.join(0.3)
    assert t.is_alive() and not outcome  # the window is full: send blocks
    with pytest.raises(PeerError):
        p.close(timeout=0.2)  # nothing is ever ACKed
    t.join(10)
    assert outcome == ["NexusError"]
    router.close(0)


class _LateWake:
    """The producer's wake socket, but a wake-up sent while closing comes only after the
    I/O thread ended (the interleaving that hung close() in CI once)."""

    def __init__(self, producer: Producer):
        self.producer, self.sock = producer, producer._wake_w

    def send(self, data: bytes, flags: int = 0) -> None:
        if self.producer._closing is not None:
            self.producer._thread.join(10)
            assert not self.producer._thread.is_alive()
            # the reader's end is gone once the writer processed that (asynchronously)
            wait_for(lambda: not self.sock.get(zmq.EVENTS) & zmq.POLLOUT, 5, 0.01, "the wake pipe closed")
        self.sock.send(data, flags)

    def close(self, linger: int | None = None) -> None:
        self.sock.close(linger)


def test_close_returns_when_the_io_thread_ended_before_its_wake_up(tmp_path, zctx):
    endpoint = f"ipc://{tmp_path}/confirm"
    router = bind(zctx, zmq.ROUTER, endpoint)
    p = Producer(endpoint, source="late-wake", confirm=True)
    p._wake_w = _LateWake(p)
    closer = threading.Thread(target=p.close, kwargs={"timeout": 1.0}, daemon=True)
    closer.start()
    closer.join(15)
    assert not closer.is_alive(), "close() blocked on a wake-up nobody reads"
    router.close(0)


# -- adaptive batching ------------------------------------------------------------------
@pytest.fixture
def long_nap(monkeypatch):
    """Make a nap long enough to see: anything that arrives within half of it was not held."""
    monkeypatch.setattr(producer_module, "NAP_MS", 2000)
    return 1.0


def test_an_event_to_an_idle_producer_goes_out_at_once(tmp_path, zctx, long_nap):
    endpoint = f"ipc://{tmp_path}/ingest"
    pull = bind(zctx, zmq.PULL, endpoint)
    p = Producer(endpoint, source="idle", confirm=False)
    try:
        p.send("test.idle", {"i": 0})
        assert len(receive_events(pull, 1, timeout=long_nap)) == 1
        # a burst: the I/O thread naps between batches; flush wakes it
        for i in range(600):
            p.send("test.idle", {"i": i})
        p.flush(long_nap)
        assert len(receive_events(pull, 600, timeout=long_nap)) == 600
        # once the burst is over the I/O thread waits for a wake-up again ...
        wait_for(lambda: not p._signaled, 10, message="the I/O thread to go idle")
        # ... so a lone event is not held back
        start = time.monotonic()
        p.send("test.idle", {"i": -1})
        assert len(receive_events(pull, 1, timeout=long_nap)) == 1
        assert time.monotonic() - start < long_nap
    finally:
        p.close(5)


def test_a_full_window_ends_a_nap(tmp_path, zctx, monkeypatch):
    monkeypatch.setattr(producer_module, "NAP_MS", 10_000)
    endpoint = f"ipc://{tmp_path}/ingest"
    pull = bind(zctx, zmq.PULL, endpoint)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.extend(receive_events(pull, 3000, 30)))
    reader.start()
    p = Producer(endpoint, source="full", confirm=False, window=100)  # full long before a wake at 500
    start = time.monotonic()
    for i in range(3000):
        p.send("test.full", {"i": i})
    assert time.monotonic() - start < 5  # 30 windows: not 30 naps of 10 s
    p.close(10)
    reader.join(40)
    assert len(received) == 3000


def test_batches_grow_under_load(tmp_path, zctx):
    endpoint = f"ipc://{tmp_path}/ingest"
    pull = bind(zctx, zmq.PULL, endpoint)
    messages = []

    def read() -> None:
        deadline = time.monotonic() + 30
        n = 0
        while n < 20_000 and pull.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            m = len(batch_decoder.decode(pull.recv()).events)
            messages.append(m)
            n += m

    reader = threading.Thread(target=read)
    reader.start()
    with Producer(endpoint, source="load", confirm=False) as p:
        for i in range(20_000):
            p.send("test.load", {"i": i})
    reader.join(40)
    assert sum(messages) == 20_000
    assert sum(messages) / len(messages) >= 16, f"{len(messages)} messages for 20,000 events"


# -- a caller that never sleeps ------------------------------------------------------------
def spin(seconds: float) -> None:
    """Compute instead of sleeping: never releases the interpreter lock voluntarily."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_caller_that_never_sleeps_sends_its_due_events_itself(tmp_path, zctx, monkeypatch):
    """The I/O thread of a producer whose caller spins gets the interpreter lock late (a
    switch interval per turn). Here it never takes an event at all (the extreme case):
    the caller's own send() still delivers them, in order, and they are ACKed while it
    keeps spinning."""
    endpoint = f"ipc://{tmp_path}/confirm"
    router = bind(zctx, zmq.ROUTER, endpoint)
    starved = threading.Event()
    starved.set()
    original = producer_module.Outbox.next_batch

    def next_batch(self, now):
        if starved.is_set() and threading.current_thread().name == "nexus-producer":
            return None  # the I/O thread never gets to the pending events
        return original(self, now)

    monkeypatch.setattr(producer_module.Outbox, "next_batch", next_batch)
    p = Producer(endpoint, source="busy", confirm=True, ack_timeout=600)
    stop = threading.Event()
    sends = [0]

    def caller() -> None:
        while not stop.is_set() and sends[0] < 1_000_000:
            p.send("test.busy", {"i": sends[0]})
            sends[0] += 1
            spin(0.0002)

    received: list[int] = []

    def serve() -> bool:
        """The router's side: take what came (at most 100 messages a call: it competes for
        the interpreter lock with the spinning caller, which may send faster than it takes,
        and wait_for must get to check), check the order, ACK it."""
        for _ in range(100):
            if not router.poll(0):
                break
            peer, raw = router.recv_multipart()
            batch = batch_decoder.decode(raw)
            assert batch.seq == len(received) + 1  # nothing skipped, nothing resent
            received.extend(msgspec.msgpack.decode(bytes(e))["payload"]["i"] for e in batch.events)
            router.send_multipart([peer, encoder.encode(ProducerReply(ack=len(received)))])
        return p._outbox.settled >= 300

    worker = threading.Thread(target=caller)
    worker.start()
    try:
        wait_for(serve, timeout=60, message="300 events ACKed while the caller spins")
        assert worker.is_alive()  # still spinning: it never had to stop for them to go out
    finally:
        stop.set()
        worker.join(30)
        starved.clear()
    p.send("test.busy", {"i": sends[0]})  # the I/O thread sends the idle tail
    sends[0] += 1
    closer = threading.Thread(target=p.close, args=(30,))
    closer.start()
    wait_for(lambda: serve() and len(received) == sends[0], timeout=30, message="the tail")
    closer.join(30)
    assert received == list(range(sends[0]))


# A router of its own process: a reader thread in the test's process would itself wait
# for the interpreter lock the spinning caller holds (one message per switch interval)
READER = textwrap.dedent("""
    import sys
    import zmq
    sys.path.insert(0, {repo!r})
    from nexus.protocol.wire import batch_decoder
    endpoint, count = sys.argv[1], int(sys.argv[2])
    pull = zmq.Context().socket(zmq.PULL)
    pull.bind(endpoint)
    print("bound", flush=True)
    seen = []
    while len(seen) < count and pull.poll(30_000):
        seen += [bytes(e) for e in batch_decoder.decode(pull.recv()).events]
    sys.stdout.buffer.write(b"".join(len(e).to_bytes(4, "big") + e for e in seen))
""")


def test_an_async_caller_that_never_yields_sends_its_due_events_itself(tmp_path):
    """AsyncProducer.send awaits nothing while the window has room, so a caller that
    computes between sends never lets the sender task run: send() sends due events."""
    endpoint = f"ipc://{tmp_path}/ingest"
    sends = 5_000  # well below a full window (20,000), which would make send() wait
    reader = subprocess.Popen(
        [sys.executable, "-c", READER.format(repo=REPO), endpoint, str(sends)], stdout=subprocess.PIPE
    )
    try:
        assert select.select([reader.stdout], [], [], 30)[0] and reader.stdout.readline() == b"bound\n"

        async def main() -> int:
            p = AsyncProducer(endpoint, source="busy", confirm=False, window=20_000)
            for i in range(sends):
                await p.send("test.busy", {"i": i})
                spin(0.0002)
            handed = p._outbox.sent_events - len(p._held)  # before the caller first yields
            await p.close(10)
            return handed

        handed = asyncio.run(main())
        # the sender task never ran: without send() sending, nothing would have left
        assert handed >= sends * 0.9, f"{handed} of {sends} events left while the caller never yielded"
        out, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
        reader.wait(10)
    events, i = [], 0
    while i < len(out):
        n = int.from_bytes(out[i : i + 4], "big")
        events.append(out[i + 4 : i + 4 + n])
        i += 4 + n
    assert [msgspec.msgpack.decode(e)["payload"]["i"] for e in events] == list(range(sends))


# -- an event after a quiet spell ----------------------------------------------------------------
def test_an_event_after_a_quiet_spell_is_due_at_once_and_a_burst_still_batches():
    from nexus.producer.outbox import IDLE_GAP_S, Outbox

    box = Outbox("p", confirm=False, window=100, ack_timeout=3.0)
    box.add("a", b"x")
    now = time.monotonic()
    assert box.due(now)  # nothing was ever taken: at once
    assert box.next_batch(now) is not None
    box.add("b", b"x")
    box.add("c", b"x")
    assert not box.due(now)  # a burst right after a take waits to batch (DUE_S)
    box.next_batch(now)
    box.add("d", b"x")
    assert not box.due(now + IDLE_GAP_S / 2)  # the next event of a fast stream batches too
    assert box.due(now + IDLE_GAP_S * 1.01)  # alone after the gap: at once (1.01: float rounding of now + gap - now)


def test_an_event_after_a_quiet_spell_leaves_from_the_callers_send(tmp_path, zctx, monkeypatch):
    """No wait for the I/O thread (here it never takes an event): send() sends it itself."""
    endpoint = f"ipc://{tmp_path}/ingest"
    pull = bind(zctx, zmq.PULL, endpoint)
    original = producer_module.Outbox.next_batch

    def next_batch(self, now):
        if threading.current_thread().name == "nexus-producer":
            return None
        return original(self, now)

    monkeypatch.setattr(producer_module.Outbox, "next_batch", next_batch)
    p = Producer(endpoint, source="quiet", confirm=False)
    try:
        wait_for(lambda: p._sock is not None, 10, message="the producer's socket")
        for i in range(3):
            p.send("test.quiet", {"i": i})
            assert len(receive_events(pull, 1, timeout=10)) == 1
            time.sleep(0.001)  # a quiet spell
    finally:
        monkeypatch.setattr(producer_module.Outbox, "next_batch", original)
        p.close(5)


def test_an_async_event_after_a_quiet_spell_leaves_without_a_loop_turn(tmp_path, zctx):
    endpoint = f"ipc://{tmp_path}/ingest"
    pull = bind(zctx, zmq.PULL, endpoint)
    received: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            if pull.poll(20):
                received.extend(bytes(e) for e in batch_decoder.decode(pull.recv()).events)

    reader = threading.Thread(target=read)
    reader.start()

    async def main() -> bool:
        p = AsyncProducer(endpoint, source="quiet", confirm=False)
        await p.send("test.quiet", {"i": 0})  # the first send connects; the sender task starts
        await asyncio.sleep(0.01)
        await p.send("test.quiet", {"i": 1})
        # no await from here on: the sender task cannot run, so only send() itself sent it
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        arrived = len(received) == 2
        await p.close(5)
        return arrived

    try:
        assert asyncio.run(main()), "the event waited for the sender task"
    finally:
        done.set()
        reader.join(10)


def test_an_async_caller_that_never_yields_leaves_no_pile_of_loop_callbacks(tmp_path, zctx):
    """zmq.asyncio's send and EVENTS read schedule a loop callback while the receiver
    waits; send() must not pile one up per event for the turn the caller finally yields
    (the pile delayed that turn by milliseconds)."""
    endpoint = f"ipc://{tmp_path}/confirm"
    router = bind(zctx, zmq.ROUTER, endpoint)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            if router.poll(20):
                peer, raw = router.recv_multipart()
                batch = batch_decoder.decode(raw)
                router.send_multipart([peer, encoder.encode(ProducerReply(ack=batch.seq + len(batch.events) - 1))])

    server = threading.Thread(target=serve)
    server.start()

    async def main() -> tuple[int, int]:
        p = AsyncProducer(endpoint, source="pile", confirm=True)
        await p.send("test.pile", {"i": -1})
        await p.flush(10)
        loop = asyncio.get_running_loop()
        scheduled = [0]
        call_later, call_soon = loop.call_later, loop.call_soon

        def count_later(*args, **kwargs):
            scheduled[0] += 1
            return call_later(*args, **kwargs)

        def count_soon(*args, **kwargs):
            scheduled[0] += 1
            return call_soon(*args, **kwargs)

        loop.call_later, loop.call_soon = count_later, count_soon  # type: ignore[method-assign]
        sends = 2000
        for i in range(sends):
            await p.send("test.pile", {"i": i})  # the window has room: never yields
            spin(0.0001)  # replies come meanwhile
        piled = scheduled[0]
        loop.call_later, loop.call_soon = call_later, call_soon  # type: ignore[method-assign]
        await p.flush(10)
        await p.close(10)
        return piled, sends

    try:
        piled, sends = asyncio.run(main())
    finally:
        done.set()
        server.join(10)
    assert piled < sends / 20, f"{piled} loop callbacks scheduled for {sends} sends"
