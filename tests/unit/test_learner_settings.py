"""The learner's rating range setting: from the environment and the command line, with clear errors."""
from __future__ import annotations

import pytest

from learner.settings import LearnerSettings, parse_rating_range
from stream.cli import build_parser


@pytest.mark.parametrize(("text", "expected"), [("", None), ("  ", None), ("1,5", (1.0, 5.0)), ("-1, 1.5", (-1.0, 1.5))])
def test_a_rating_range_parses(text: str, expected: tuple[float, float] | None) -> None:
    assert parse_rating_range(text) == expected


@pytest.mark.parametrize("text", ["5", "1,2,3", "a,b", "5,1", "1,1", "nan,5", "1,inf"])
def test_a_bad_rating_range_says_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match="rating range"):
        parse_rating_range(text)


def test_the_range_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_RATING_RANGE", "1,5")
    assert LearnerSettings(bootstrap_servers="-").rating_range == (1.0, 5.0)
    monkeypatch.delenv("STREAMREC_RATING_RANGE")
    assert LearnerSettings(bootstrap_servers="-").rating_range is None


def test_the_learner_command_takes_and_checks_a_rating_range(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["learner", "--rating-range", "0.5,5"]).rating_range == (0.5, 5.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["learner", "--rating-range", "5,1"])
    assert "rating range '5,1': expected finite numbers with low < high" in capsys.readouterr().err
