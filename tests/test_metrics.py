"""The metrics' labels: a value from outside never makes a new label."""

from __future__ import annotations

import pytest

from gateway.metrics import Metrics


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
