"""The shared ConfigMap loader: a fresh install without its ConfigMap is a warning (waiting), not an error;
an invalid or deleted configuration is an error, and the last good one stays."""

import logging

from fleetkeeper.core import errors
from fleetkeeper.core.configmap import ConfigMapKey


def parse(text, source):
    if text is None:
        raise errors.ConfigError(source, [("", None, "ConfigMap not found")])
    if text != "good":
        raise errors.ConfigError(source, [("", text, "not good")])
    return text


def cm(value):
    return {"metadata": {"name": "x", "namespace": "ns", "resourceVersion": "1"}, "data": {"k": value}}


def levels(caplog):
    return [r.levelno for r in caplog.records if r.name == "fleetkeeper.config"]


def test_absent_before_any_configuration_warns_then_deleted_after_one_is_an_error(caplog):
    key = ConfigMapKey(None, "ns", "x", "k", parse)
    with caplog.at_level(logging.INFO, logger="fleetkeeper.config"):
        assert key.offer(None) is None
        assert levels(caplog) == [logging.WARNING] and key.error is not None
        caplog.clear()
        assert key.offer(cm("bad")) is None  # invalid: an error even before any good version
        assert levels(caplog) == [logging.ERROR]
        caplog.clear()
        assert key.offer(cm("good")) == "good" and key.error is None
        caplog.clear()
        assert key.offer(None) is None  # deleted after a good one: an error, the good one stays
        assert levels(caplog) == [logging.ERROR] and key.last_good == "good"
