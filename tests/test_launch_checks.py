"""Start-up checks that turn a wrong environment into a clear exit 2 instead of a silent change:
dependency versions outside the tested ranges, and GPUs allocated but CUDA unusable."""

from __future__ import annotations

import pytest

from mythos_scale.config import ConfigError
from mythos_scale.train import train_cli
from mythos_scale.versions import ALLOW_UNTESTED_ENV, TESTED, requirement, untested_versions


def _tested() -> dict[str, str]:
    return {package: low for package, (low, _, _) in TESTED.items()}


def test_installed_versions_are_the_tested_ones():
    assert untested_versions() == []


@pytest.mark.parametrize("version, ok", [("2.14", True), ("2.14.1+cu130", True), ("2.13.9", False), ("2.15.0", False),
                                         (None, False)])
def test_versions_outside_the_range_are_named(version, ok):
    problems = untested_versions({**_tested(), "torch": version})
    assert (problems == []) is ok
    if not ok:
        assert len(problems) == 1 and problems[0].startswith("torch") and ">=2.14,<2.15" in problems[0]
        assert ("not installed" in problems[0]) is (version is None)


def test_setup_pins_are_the_checked_ranges():
    assert requirement("deepspeed") == "deepspeed>=0.19.8,<0.20"


def test_train_refuses_untested_versions_unless_allowed(monkeypatch, capsys):
    monkeypatch.setattr(train_cli, "untested_versions", lambda: ["deepspeed 0.16.0 is installed, tested: >=0.19.8,<0.20"])
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"deepspeed 0.16.0 is installed.*{ALLOW_UNTESTED_ENV}=1"):
        train_cli.check_versions()
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    train_cli.check_versions()
    assert "warning: untested versions" in capsys.readouterr().err
