"""KV states of recent conversations, kept in memory, found by the tokens they hold.

A request that continues a conversation (or repeats a system message) starts
from the longest stored state whose tokens are a prefix of its own, so only its
new tokens are prefilled. The store is an LRU bounded by bytes; states are
added from the engine's thread and looked up from request threads.
"""

import threading
from collections import OrderedDict
from typing import Optional, Sequence, Tuple


class StateCache:
    """An LRU of single-sequence KV states keyed by the token ids they hold, bounded by bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.states: "OrderedDict[Tuple[int, ...], list]" = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def size(cache: list) -> int:
        return sum(c.nbytes for c in cache)

    def longest_prefix(self, ids: Sequence[int], at_least: int = 0) -> Tuple[int, Optional[list]]:
        """The stored state with the most tokens (more than ``at_least``) that are a strict prefix of ``ids``."""
        with self._lock:
            best, state = at_least, None
            for key, cache in self.states.items():
                n = len(key)
                if best < n < len(ids) and tuple(ids[:n]) == key:
                    best, state = n, cache
            if state is not None:
                self.states.move_to_end(tuple(ids[:best]))
            return best, state

    def put(self, ids: Sequence[int], cache: list) -> None:
        key = tuple(ids)
        size = self.size(cache)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self.states.pop(key, None)
            if old is not None:
                self.nbytes -= self.size(old)
            self.states[key] = cache
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, evicted = self.states.popitem(last=False)
                self.nbytes -= self.size(evicted)

    def __len__(self) -> int:
        return len(self.states)
