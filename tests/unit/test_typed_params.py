"""fedseg.typed_params: declared keys, defaults, and refusals in the strategies' words."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass

import pytest

from fedseg.errors import InputError
from fedseg.typed_params import param, param_defaults, param_keys, parse_params


@dataclass(frozen=True)
class Example:
    switch: bool = param(True)
    weight: float = param(0.5, minimum=0)
    size: int = param(200, integer=True, positive=True)
    mode: str = param("a", choices=("a", "b"))
    lr: float | None = param(None, key="ex.lr", positive=True)
    path: str | None = param(None, key="ex.path", text=True, expects="a file path")
    digest: str | None = param(None, key="ex.digest", text=True, length=4, expects="a 4-character digest",
                               show_value=False)


def test_defaults_and_declared_keys() -> None:
    assert parse_params(Example, {}) == Example()
    assert param_keys(Example) == {"switch", "weight", "size", "mode", "ex.lr", "ex.path", "ex.digest"}
    assert param_defaults(Example)["ex.lr"] is None and param_defaults(Example)["size"] == 200
    with pytest.raises(FrozenInstanceError):
        Example().size = 3  # type: ignore[misc]


def test_reads_only_its_keys_and_keeps_values_as_given() -> None:
    got = parse_params(Example, {"ex.lr": 2, "weight": 0, "other": object(), "mode": "b", "ex.digest": "abcd"})
    assert got == Example(weight=0, mode="b", lr=2, digest="abcd")
    assert type(got.lr) is int


@pytest.mark.parametrize("params, message", [
    ({"switch": "yes"}, "switch must be true or false, got 'yes'"),
    ({"switch": 1}, "switch must be true or false, got 1"),
    ({"weight": -1}, "weight must be a number >= 0, got -1"),
    ({"weight": True}, "weight must be a number >= 0, got True"),
    ({"weight": "1"}, "weight must be a number >= 0, got '1'"),
    ({"weight": float("nan")}, "weight must be a number >= 0, got nan"),
    ({"weight": float("inf")}, "weight must be a number >= 0, got inf"),
    ({"weight": None}, "weight must be a number >= 0, got None"),
    ({"size": 0}, "size must be a positive integer, got 0"),
    ({"size": 2.0}, "size must be a positive integer, got 2.0"),
    ({"size": False}, "size must be a positive integer, got False"),
    ({"mode": "x"}, "mode must be one of a, b, got 'x'"),
    ({"ex.lr": 0}, "ex.lr must be a positive number, got 0"),
    ({"ex.lr": False}, "ex.lr must be a positive number, got False"),
    ({"ex.path": ""}, "ex.path must be a file path, got ''"),
    ({"ex.path": 3}, "ex.path must be a file path, got 3"),
    ({"ex.digest": "abc"}, "ex.digest must be a 4-character digest"),
])
def test_refusals(params, message) -> None:
    with pytest.raises(InputError) as caught:
        parse_params(Example, params)
    assert caught.value.detail == message


def test_the_first_declared_bad_key_is_refused() -> None:
    with pytest.raises(InputError, match="^switch"):
        parse_params(Example, {"size": 0, "switch": "no"})


def test_a_field_without_param_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Bare:
        x: int = 1

    with pytest.raises(TypeError):
        parse_params(Bare, {})
