"""Progress off a terminal: a log gets a few lines per task, always the last step."""

from __future__ import annotations

import pytest

from fedseg.cli.console import Reporter


def test_plain_progress_prints_every_tenth_and_the_last_step(capsys: pytest.CaptureFixture) -> None:
    with Reporter(interactive=False).progress("train site_a", 45) as advance:
        for i in range(45):
            advance(info=f"loss {i}")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 12 and lines[0].startswith("train site_a: 4/45")
    assert lines[-1].startswith("train site_a: 45/45") and lines[-1].endswith("loss 44")


def test_quiet_prints_nothing(capsys: pytest.CaptureFixture) -> None:
    reporter = Reporter(quiet=True, interactive=False)
    with reporter.progress("predict", 3) as advance:
        advance()
    reporter.log("done")
    assert capsys.readouterr().err == ""


def test_strategy_help_and_default_come_from_the_registry() -> None:
    from fedseg.cli.options import STRATEGY, STRATEGY_HELP, STRATEGY_NAMES
    from fedseg.federation.strategies import DEFAULT_STRATEGY, strategy_names

    assert list(STRATEGY_NAMES) == strategy_names()
    assert all(name in STRATEGY_HELP for name in strategy_names())
    assert STRATEGY.default == DEFAULT_STRATEGY in strategy_names()
