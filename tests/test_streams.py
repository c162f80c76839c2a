"""Hand-over of stream chunks between the plugin's event loop and worker threads."""

from __future__ import annotations

import asyncio
import threading

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
