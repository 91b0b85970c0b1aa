"""Dashboard lists are paged newest first: each page links to its neighbours, and only to those that exist."""

from __future__ import annotations

from dlis_market.broker.routes.dashboard import _page_of


def test_pages_link_only_to_neighbours_that_exist():
    items = list(range(120))  # newest first
    first, pager = _page_of(items, 0, 50)
    assert first == list(range(50)) and pager == {"page": 0, "newer": None, "older": 1}
    middle, pager = _page_of(items, 1, 50)
    assert middle == list(range(50, 100)) and pager == {"page": 1, "newer": 0, "older": 2}
    last, pager = _page_of(items, 2, 50)
    assert last == list(range(100, 120)) and pager == {"page": 2, "newer": 1, "older": None}
    exact, pager = _page_of(list(range(100)), 1, 50)
    assert len(exact) == 50 and pager["older"] is None
