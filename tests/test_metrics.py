"""The metrics' labels: a value from outside never makes a new label."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from gateway.store import open_store


@pytest.mark.parametrize(
    ("cause", "label"),
    [
        (None, "none"),
        (0, "0"),
        (17, "17"),
        (127, "127"),
        (128, "other"),
        (-1, "other"),
        (10**23, "other"),
    ],
)
def test_hangup_cause_labels_are_q850_values_none_or_other(cause: int | None, label: str) -> None:
    metrics = Metrics(key_daily_calls=100)
    metrics.call_ended("busy", cause)
    value = metrics.registry.get_sample_value("otp_call_hangup_causes_total", {"cause": label})
    assert value == 1.0


def test_out_of_range_causes_share_one_label() -> None:
    metrics = Metrics(key_daily_calls=100)
    for cause in range(128, 10_128):
        metrics.call_ended("error", cause)
    labels = {
        sample.labels["cause"]
        for family in metrics.registry.collect()
        if family.name == "otp_call_hangup_causes"
        for sample in family.samples
    }
    assert labels == {"other"}


async def test_the_sqlite_stores_cpu_is_exported(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "gateway.sqlite3")
    try:
        metrics = Metrics(key_daily_calls=100)
        metrics.watch(store, lambda: 0, lambda: 0, lambda: True)
        await store.api_keys()
        assert store.cpu_seconds
        exported = {
            sample.name: sample.value
            for family in text_string_to_metric_families((await metrics.render(store)).decode())
            for sample in family.samples
        }
        # As it was after the scrape's own reads of the store.
        assert exported["otp_store_cpu_seconds_total"] == store.cpu_seconds
    finally:
        await store.close()
