"""Environment switches read by the ops on every call, read once per ``facm_ext.jvp`` call instead.

The backend switches (FACM_EXT_BACKEND, FACM_EXT_EAGER_DISPATCH, TRITON_INTERPRET, ...) are read in every op call:
about a thousand ``os.environ`` reads per LightningDiT-XL JVP, 0.5 us each (the key is encoded, looked up and the
value decoded on every read), on a transform that is host-bound on the GPU. While :class:`snapshot` is active in a
thread (facm_ext.jvp holds one for the duration of a call), :func:`get` reads each name from ``os.environ`` once
and returns the value it read from then on; outside a snapshot it reads ``os.environ`` every time. A change of the
environment made between two facm_ext.jvp calls, or between two direct op calls, is therefore seen by the next
call; a change made by the transformed function in the middle of a call is not (an op's backend is meant to be
chosen per call, not per layer).
"""

from __future__ import annotations

import os
import threading
from typing import Optional


class _Snapshot(threading.local):
    def __init__(self):
        # name -> the value read (None: unset), and parse function -> its result (see per_snapshot); None while no
        # snapshot is active in this thread.
        self.values: Optional[dict] = None


_SNAPSHOT = _Snapshot()


def get(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``, read once per active snapshot."""
    values = _SNAPSHOT.values
    if values is None:
        return os.environ.get(name, default)
    try:
        value = values[name]
    except KeyError:
        value = values[name] = os.environ.get(name)
    return default if value is None else value


def per_snapshot(parse):
    """Decorator for a zero-argument function of the environment switches (a parse of :func:`get` values): while a
    snapshot is active, its result is computed once; an exception it raises is not kept (the next call raises
    again). The parse (strip, lower, compare) costs as much as the cached read itself, and runs once per op call."""

    def cached():
        values = _SNAPSHOT.values
        if values is None:
            return parse()
        try:
            return values[cached]
        except KeyError:
            result = values[cached] = parse()
            return result

    cached.__name__, cached.__qualname__, cached.__doc__ = parse.__name__, parse.__qualname__, parse.__doc__
    cached.__wrapped__ = parse
    return cached


class snapshot:
    """While active in this thread, :func:`get` reads each name once. Nested snapshots share the outermost one's
    values."""

    __slots__ = ("prev",)

    def __enter__(self):
        self.prev = _SNAPSHOT.values
        if self.prev is None:
            _SNAPSHOT.values = {}
        return self

    def __exit__(self, *exc_info):
        _SNAPSHOT.values = self.prev
