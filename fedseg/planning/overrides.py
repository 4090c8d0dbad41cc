"""`--set KEY=VALUE` overrides of a plan: plan keys (training.*, configuration.*, seed),
checked against PLAN_SETTINGS, and every other key a strategy parameter."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fedseg.errors import InputError
from fedseg.planning.settings import PLAN_SETTINGS, unknown_key_message


def parse_value(raw: Any) -> Any:
    """A --set value: JSON when it parses ("3" -> 3, "[1,2]" -> list, "true" -> True), else the string."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return raw


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict, dict, dict, int | None]:
    """(training, configuration, strategy params, seed) from dotted --set keys.

    Plan keys (training.*, configuration.*, seed) are checked here against PLAN_SETTINGS;
    every other key is a strategy parameter, checked by the strategy (Strategy.check_params).
    """
    training: dict[str, Any] = {}
    configuration: dict[str, Any] = {}
    strategy: dict[str, Any] = {}
    seed = None
    for key in sorted(overrides):
        if not isinstance(key, str) or not key.strip():
            raise InputError(f"--set needs key=value, got key {key!r}")
        value = parse_value(overrides[key])
        key = key.strip()
        if key in PLAN_SETTINGS:
            value = PLAN_SETTINGS[key].validate(value)
            family, _, name = key.rpartition(".")
            if family == "training":
                training[name] = value
            elif family == "configuration":
                configuration[name] = value
            else:
                seed = value
        elif key.startswith(("training.", "configuration.")):
            family = key.split(".", 1)[0]
            raise InputError(unknown_key_message(key, [k for k in PLAN_SETTINGS if k.startswith(family + ".")]))
        else:
            name = key[len("strategy."):] if key.startswith("strategy.") else key
            if not name:
                raise InputError(f"--set key {key!r} names no strategy parameter")
            strategy[name] = value
    return training, configuration, strategy, seed


def final_strategy_params(overrides: Mapping[str, Any], strategy_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The strategy params a plan will hold: `strategy_params` updated by the strategy keys of
    `overrides` (`--set`), which win. What a strategy's traits may depend on (e.g. whether
    every site must hold the same channels)."""
    return {**dict(strategy_params or {}), **split_overrides(overrides)[2]}
