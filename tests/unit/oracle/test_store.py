"""The oracle's store: every intake is one transaction, and what counts once cannot count twice."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from dlis_market.oracle.epochs import build_record
from dlis_market.oracle.privacy import BudgetAccountant, NodeContribution, release_aggregates
from dlis_market.oracle.store import DB_FILE, EpochStatus, OracleStore, StoreError, database_url
from dlis_market.oracle.telemetry import ReceivedTelemetry
from dlis_market.protocol.telemetry import UINT64_MAX, SignedTelemetry
from dlis_market.settings import Settings

from .conftest import NOW

NODE = "0x" + "11" * 20


@pytest.fixture()
def store(tmp_path: Path) -> OracleStore:
    return OracleStore(f"sqlite:///{tmp_path / DB_FILE}")


def test_database_url_defaults_to_a_file_under_the_state_dir(tmp_path: Path) -> None:
    settings = Settings.model_validate({"home": str(tmp_path)})
    assert database_url(settings) == f"sqlite:///{tmp_path / 'oracle' / DB_FILE}"
    settings = Settings.model_validate({"home": str(tmp_path), "oracle": {"state_dir": str(tmp_path / "s")}})
    assert database_url(settings) == f"sqlite:///{tmp_path / 's' / DB_FILE}"
    url = "postgresql+psycopg://oracle@127.0.0.1/oracle"
    assert database_url(Settings.model_validate({"oracle": {"database_url": url}})) == url


def test_a_report_and_its_seq_are_kept_together(
    store: OracleStore, make_report: Callable[..., SignedTelemetry]
) -> None:
    first = make_report(seq=UINT64_MAX - 1)  # uint64 seqs are wider than SQL integers
    store.add_report(7, ReceivedTelemetry(received_at=NOW + 0.25, telemetry=first))
    node = first.report.node
    assert store.last_seqs() == {node: UINT64_MAX - 1}
    again = make_report(seq=UINT64_MAX - 1, timestamp=NOW + 1)  # the same seq again: refused whole
    with pytest.raises(IntegrityError):
        store.add_report(7, ReceivedTelemetry(received_at=NOW + 1, telemetry=again))
    assert store.report_count() == 1 and store.last_seqs() == {node: UINT64_MAX - 1}
    store.add_report(7, ReceivedTelemetry(received_at=NOW + 1, telemetry=make_report(seq=9)))  # not the max
    assert store.last_seqs() == {node: UINT64_MAX - 1}  # seqs compare as numbers, not as text
    store.add_report(8, ReceivedTelemetry(received_at=NOW + 2, telemetry=make_report(seq=UINT64_MAX)))
    assert store.last_seqs() == {node: UINT64_MAX}
    assert [r.telemetry.report.seq for r in store.reports_after(7)] == [UINT64_MAX]
    assert store.report_count() == 3 and store.report_count(7) == 2
    assert store.reports_after(6)[0] == ReceivedTelemetry(received_at=NOW + 0.25, telemetry=first)
    assert store.epochs_with_data(0, 8) == [7, 8] and store.epochs_with_data(7, 7) == []


def test_results_count_once_with_their_key(store: OracleStore) -> None:
    assert store.count_checks("pass a job 0", 5, [(NODE, True), ("0x" + "22" * 20, True)])
    assert not store.count_checks("pass a job 0", 5, [(NODE, True)])  # posted again: nothing written
    assert store.checks_after(4) == [(5, NODE, True), (5, "0x" + "22" * 20, True)]
    assert store.checks_after(5) == []


def _finish(store: OracleStore, epoch: int, accountant: BudgetAccountant) -> BudgetAccountant:
    record = build_record(epoch, {NODE: 5000}, {NODE: [b"\x01" * 32]})
    contributions = {NODE: NodeContribution(uptime_fraction=1.0, measured_tps=10.0, latencies_ms=(20.0,))}
    intent = store.intend_epoch(record, contributions)
    assert store.intend_epoch(record, {}) == intent  # recorded once: a retry gets the same intent
    charged = copy.deepcopy(accountant)
    agg = release_aggregates(epoch, intent.contributions, 1.0, 100.0, charged, np.random.default_rng(0))
    store.finish_epoch(intent.record, agg, charged)
    return charged


def test_an_epoch_spends_the_privacy_budget_once(store: OracleStore) -> None:
    accountant = store.accountant(3.0, 100)
    charged = _finish(store, 4, accountant)
    assert store.epoch_status(4) == EpochStatus.POSTED and store.open_epochs() == []
    assert [f for f, _ in store.releases(4)] == ["availability", "latency_histogram", "capacity"]
    assert store.accountant(3.0, 100).spent == charged.spent == {NODE: pytest.approx(1.0)}
    with pytest.raises(StoreError, match="epoch 4 is posted"):  # finished twice: refused, nothing spent
        store.finish_epoch(store.load_epoch(4), store.aggregates(4), charged)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="already posted"):
        store.intend_epoch(store.load_epoch(4), {})
    assert store.accountant(3.0, 100).spent == {NODE: pytest.approx(1.0)}
    assert store.proof(NODE, 4).verifies_offline()


def test_a_failed_finish_leaves_the_epoch_open_and_the_budget_untouched(store: OracleStore) -> None:
    accountant = store.accountant(3.0, 100)
    record = build_record(9, {NODE: 5000}, {NODE: []})
    store.intend_epoch(record, {})
    charged = copy.deepcopy(accountant)
    charged.charge([NODE], 1.0, 9, "availability")
    charged.releases.append(dict(charged.releases[-1]))  # the same figure twice: the transaction fails
    agg = release_aggregates(9, {}, 1.0, 1.0, BudgetAccountant(1.0, 1), np.random.default_rng(0))
    with pytest.raises(IntegrityError):
        store.finish_epoch(record, agg, charged)
    assert store.epoch_status(9) == EpochStatus.POSTING and store.aggregates(9) is None
    assert store.accountant(3.0, 100).spent == {} and store.releases(9) == []
