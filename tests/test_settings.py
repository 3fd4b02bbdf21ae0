import math

import pytest

from exme_callback.settings import SearchSettings, validate_grid


def test_validate_grid():
    assert validate_grid("alphas", [0, 0.5], low=0.0) == (0.0, 0.5)
    for bad in ([], [math.inf], [True], ["0.1"], [0.2, 0.2]):
        with pytest.raises(ValueError, match="`alphas`"):
            validate_grid("alphas", bad, low=0.0)
    with pytest.raises(TypeError, match="`betas` must be a sequence"):
        validate_grid("betas", 0.5, low=0.0, high=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 1}, "`top_k` must be an integer >= 2"),
        ({"kinship_threshold": 1.5}, r"`kinship_threshold` must be in \[-1.0, 1.0\]"),
        ({"kinship_metric": "euclidean", "kinship_threshold": -1.0}, r"must be in \[0.0, inf\]"),
        ({"mixup_a": 0.0}, "`mixup_a`"),
        ({"mixup_draws": 0}, "`mixup_draws` must be an integer >= 1"),
        ({"dare": 0.0}, r"`dare` \(the density kept\) must be in \(0, 1\]"),
        ({"dare": 1.5}, "`dare`"),
        ({"strategy": "evolve"}, "`strategy` must be one of"),
        ({"partner": "random"}, "`partner` must be one of"),
        ({"budget": 0}, "`budget` must be an integer >= 1"),
        ({"partner": "kinship"}, "set `top_k` >= 3"),
        ({"confidence": 1.0}, r"`confidence` must be a number in \(0, 1\)"),
        ({"confidence": "95%"}, "`confidence`"),
        ({"min_gain": -0.01}, "`min_gain` must be a number >= 0"),
        ({"min_gain": "noise"}, "or 'significant'"),
        ({"min_gain": float("inf")}, "`min_gain`"),
        ({"search": "racing", "racing_margin": -0.01}, "`racing_margin` must be a number >= 0"),
        ({"search": "racing", "racing_margin": "small"}, "`racing_margin`"),
        ({"racing_margin": 0.01}, "set `search='racing'` too"),
    ],
)
def test_bad_search_settings_are_refused_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchSettings(**kwargs)


def test_racing_needs_a_strategy_that_scores_groups():
    assert SearchSettings(strategy="mixup", search="racing").search == "racing"  # M^3's draws are one group
    with pytest.raises(ValueError, match="`strategy='topk_greedy'` scores its merges one at a time"):
        SearchSettings(strategy="topk_greedy", search="racing")
    with pytest.raises(ValueError, match="`search` must be one of"):
        SearchSettings(search="bandit")


def test_auto_alphas_are_accepted_by_the_settings_and_the_command_line(monkeypatch, capsys):
    from exme_callback import cli

    assert SearchSettings(alphas="auto").alphas == "auto"
    assert SearchSettings(alphas="auto").make_strategy().evaluations(2) is None  # the lines stop where they stop
    for bad in ("automatic", ["auto", 0.1]):
        with pytest.raises((TypeError, ValueError), match="`alphas` must be .*or 'auto'"):
            SearchSettings(alphas=bad)
    seen = []
    monkeypatch.setattr(cli, "_run", lambda args: seen.append(args.settings))
    assert cli.main(["run", "RUN_DIR", "--eval-data", "val.jsonl", "--alphas", "auto"]) == 0
    assert cli.main(["run", "RUN_DIR", "--eval-data", "val.jsonl", "--alphas", "0.2", "1"]) == 0
    assert [s.alphas for s in seen] == ["auto", (0.2, 1.0)]
    for alphas, message in ((["auto", "0.1"], "--alphas must be a non-empty"), (["big"], "a number >= 0 or 'auto'")):
        with pytest.raises(SystemExit):
            cli.main(["run", "RUN_DIR", "--eval-data", "val.jsonl", "--alphas", *alphas])
        assert message in capsys.readouterr().err
