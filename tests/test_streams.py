"""Hand-over of stream chunks between the plugin's event loop and worker threads."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lcfs.driver import streams


def collect(make_iterator) -> tuple[list[bytes], set[str]]:
    """Return the items of ``iterate_in_thread`` and the names of its producer threads."""
    threads: set[str] = set()

    def traced():
        for chunk in make_iterator():
            threads.add(threading.current_thread().name)
            yield chunk

    async def main():
        workers = streams.WorkerThreads()
        items = [
            item
            async for item in streams.iterate_in_thread(traced, workers, "producer")
        ]
        assert workers.join_all(5) == []
        return items

    return asyncio.run(main()), threads


def test_small_chunks_are_joined():
    chunks = [bytes([n % 251]) * 600 for n in range(1000)]
    items, threads = collect(lambda: iter(chunks))
    assert b"".join(items) == b"".join(chunks)
    assert len(items) == 3
    assert all(len(item) >= streams.JOINED_CHUNK_SIZE for item in items[:-1])
    assert threads == {"producer"}


def test_large_chunks_pass_unchanged():
    chunks = [bytes([n]) * streams.JOINED_CHUNK_SIZE for n in range(4)]
    items, _ = collect(lambda: iter(chunks))
    assert items == chunks


def test_empty_iterator_yields_nothing():
    items, _ = collect(lambda: iter([]))
    assert items == []


def test_iterator_error_reaches_the_loop():
    def failing():
        yield b"x" * 100
        raise ValueError("layer L: broken")

    with pytest.raises(ValueError, match="layer L: broken"):
        collect(failing)


async def _chunks(items, pause: float = 0.0, error: BaseException | None = None):
    for item in items:
        if pause:
            await asyncio.sleep(pause)
        yield item
    if error is not None:
        raise error


def consume(chunks, work):
    async def main():
        workers = streams.WorkerThreads()
        try:
            return await streams.consume_in_thread(chunks, work, workers, "consumer")
        finally:
            assert workers.join_all(5) == []

    return asyncio.run(main())


def test_consumer_reads_chunks_in_order():
    items = [bytes([n % 251]) * (1 + n * 37 % 5000) for n in range(2000)]

    def work(fileobj):
        data = bytearray()
        while block := fileobj.read(4096):
            data += block
        return bytes(data)

    assert consume(_chunks(items), work) == b"".join(items)


def test_consumer_bounds_pending_chunks():
    # After the reader has taken chunk n, the generator has made at most
    # MAX_PENDING_CHUNKS queued chunks and one waiting for room beyond it.
    delivered = []
    gaps = []

    async def numbered_chunks():
        for n in range(40):
            delivered.append(n)
            yield bytes([n]) * 10

    def work(fileobj):
        for n in range(40):
            assert fileobj.read(10) == bytes([n]) * 10
            gaps.append(len(delivered) - n)
            time.sleep(0.002)
        return True

    assert consume(numbered_chunks(), work)
    assert max(gaps) <= streams.MAX_PENDING_CHUNKS + 2


def test_consumer_discards_unread_rest():
    body = _chunks([b"a" * 1000] * 50, pause=0.001)
    assert consume(body, lambda fileobj: fileobj.read(10)) == b"a" * 10


def test_consumer_broken_body_aborts_worker():
    reached = []

    def work(fileobj):
        try:
            fileobj.read()
        except streams.BodyAborted as error:
            reached.append(str(error))
            raise
        return "read to the end"

    # The caller gets the body's own error, and the worker a BodyAborted.
    body = _chunks([b"x" * 100] * 3, error=ConnectionResetError("peer gone"))
    with pytest.raises(ConnectionResetError, match="peer gone"):
        consume(body, work)
    assert len(reached) == 1
    assert "broke off" in reached[0]


def test_consumer_reports_worker_error_first():
    def work(fileobj):
        fileobj.read(1)
        raise ValueError("layer L: unknown")

    with pytest.raises(ValueError, match="layer L: unknown"):
        consume(
            _chunks([b"x"] * 20, pause=0.005, error=ConnectionResetError("peer gone")),
            work,
        )
