"""freeze_startup_heap, which the broker and every worker call once they are ready to serve:
what existed at startup leaves the collector's reach, and garbage made later is still collected."""

from __future__ import annotations

import gc
import weakref

from dlis_market.lifetime import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # freed only by the cyclic collector
    return weakref.ref(a)


def test_startup_objects_are_frozen_and_later_cycles_still_collected():
    was_enabled = gc.isenabled()
    gc.disable()  # only the collections below run: an automatic one could free a cycle between asserts
    startup = _cycle()  # garbage already at startup: the first collection frees it
    try:
        frozen = freeze_startup_heap()
        assert startup() is None
        assert gc.get_freeze_count() == frozen > 1000
        made_later = _cycle()
        assert made_later() is not None
        gc.collect()
        assert made_later() is None
        assert gc.get_freeze_count() == frozen  # later objects are not frozen by collections
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
