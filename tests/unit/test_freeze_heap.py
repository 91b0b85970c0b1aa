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


def _tracked(obj: object) -> bool:
    """Whether a collection would walk ``obj``: gc.get_objects() lists the three generations,
    not the permanent one that gc.freeze() moves objects to."""
    return any(o is obj for o in gc.get_objects())


def test_startup_objects_are_frozen_and_later_cycles_still_collected():
    was_enabled = gc.isenabled()
    gc.disable()  # only the collections below run: an automatic one could free a cycle between asserts
    startup = _cycle()  # garbage already at startup: the first collection frees it
    alive_at_startup = _Node()
    try:
        frozen = freeze_startup_heap()
        assert startup() is None
        assert frozen > 1000
        assert not _tracked(alive_at_startup)
        made_later = _cycle()
        survivor = _Node()
        assert made_later() is not None
        gc.collect()
        assert made_later() is None
        # Later objects stay in the collector's reach. The frozen count itself may only fall:
        # a frozen object that loses its last reference (in a thread an earlier test left
        # running) leaves the permanent generation, so it is not compared for equality.
        assert _tracked(survivor)
        assert gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
