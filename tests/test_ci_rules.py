"""The skip rule of tests/conftest.py: a missing requirement skips outside CI and fails under CI=true."""

from __future__ import annotations

import pytest

from tests.conftest import CI_ENV, in_ci, skip_or_fail


@pytest.mark.parametrize("value", ["true", "TRUE", " true ", "1", "yes"])
def test_ci_is_on_for_true_values(monkeypatch, value):
    monkeypatch.setenv(CI_ENV, value)
    assert in_ci()


@pytest.mark.parametrize("value", [None, "", "false", "0", "no"])
def test_ci_is_off_otherwise(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(CI_ENV, raising=False)
    else:
        monkeypatch.setenv(CI_ENV, value)
    assert not in_ci()


def test_outside_ci_a_missing_requirement_skips_with_its_reason(monkeypatch):
    monkeypatch.delenv(CI_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^node \(Node.js\) not found$"):
        skip_or_fail("node (Node.js) not found")


def test_under_ci_a_missing_requirement_fails_with_its_reason(monkeypatch):
    monkeypatch.setenv(CI_ENV, "true")
    with pytest.raises(pytest.fail.Exception, match=r"^node \(Node.js\) not found \[CI=true: ") as failure:
        skip_or_fail("node (Node.js) not found")
    assert not failure.value.pytrace  # the reason is the report, not a traceback into the helper
