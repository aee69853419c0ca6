"""The event loop that both Check front ends run on, on a thread of its own.

The main thread stays free for signals, reloads and the config-file watch.
Check calls are decided on this loop. A call that has to wait on the
network (a key refetch for an unknown `kid`, an introspection request) moves
to the wait pool, a small thread pool, so it never stalls the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent import futures
from typing import Any, TypeVar

from .verify import INTROSPECTION_POOL, KEYS_POOL

T = TypeVar("T")

# How long stop() waits for the loop thread to end, in seconds.
STOP_JOIN_SECONDS = 5.0


class LoopThread:
    """An asyncio event loop, on uvloop when it is installed, run by a daemon thread."""

    def __init__(self, wait_threads: int, name: str = "check-loop") -> None:
        self._name = name
        self.loop = _new_loop()
        # One pool per kind of wait (verify.KEYS_POOL, verify.INTROSPECTION_POOL).
        self.wait_pools = {
            kind: futures.ThreadPoolExecutor(
                max_workers=wait_threads, thread_name_prefix=f"wait-{kind}"
            )
            for kind in (KEYS_POOL, INTROSPECTION_POOL)
        }
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.loop.is_running()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop, end its thread and shut the wait pools down. Stop the servers first."""
        if self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=STOP_JOIN_SECONDS)
        # Threads still inside a network call are not waited for here. The
        # process then ends with server.exit_after_stop, which skips them.
        for pool in self.wait_pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
