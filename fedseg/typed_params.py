"""Typed parameters: a frozen dataclass declares the `--set` keys a model recipe reads, with
their defaults and checks, and `parse_params` turns a plan's parameter mapping into it.

    @dataclass(frozen=True)
    class Example:
        lr: float | None = param(None, key="example.lr", positive=True)
        size: int = param(200, integer=True, positive=True)

    parse_params(Example, {"example.lr": 0.1})   # Example(lr=0.1, size=200)

Only the declared keys are read (a plan's mapping also holds the aggregation rule's and the
engine's keys; refusing unknown keys is the strategy's job). A refusal is an InputError
"<key> must be <what it expects>, got <value>", the words users see for a bad `--set`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from fedseg.errors import InputError

T = TypeVar("T")
# metadata key of a field declared with `param`
PARAM = "fedseg.param"


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """How one key is read: its name in the mapping, its kind and its bounds."""

    key: str | None
    kind: str                      # "bool", "choice", "int", "number" or "text"
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    positive: bool = False
    length: int | None = None      # text: exactly this many characters
    expects: str | None = None     # overrides the generated "what it expects" words
    show_value: bool = True        # the refusal ends with ", got <value>"

    def expectation(self) -> str:
        """The words after "must be" in a refusal."""
        if self.expects is not None:
            return self.expects
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(str(c) for c in self.choices)
        noun = "integer" if self.kind == "int" else "number" if self.kind == "number" else "text"
        if self.positive:
            return f"a positive {noun}"
        if self.minimum is not None:
            return f"a{'n' if noun == 'integer' else ''} {noun} >= {self.minimum:g}"
        return f"a{'n' if noun == 'integer' else ''} {noun}"

    def accepts(self, value: Any) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "text":
            return isinstance(value, str) and bool(value) and (self.length is None or len(value) == self.length)
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.positive and not value > 0:
            return False
        return self.minimum is None or value >= self.minimum


def _kind(default: Any, choices: Sequence[Any] | None, integer: bool, text: bool) -> str:
    if choices is not None:
        return "choice"
    if isinstance(default, bool):
        return "bool"
    if integer:
        return "int"
    if text or isinstance(default, str):
        return "text"
    return "number"


def param(
    default: Any,
    *,
    key: str | None = None,
    minimum: float | None = None,
    positive: bool = False,
    choices: Sequence[Any] | None = None,
    integer: bool = False,
    text: bool = False,
    length: int | None = None,
    expects: str | None = None,
    show_value: bool = True,
) -> Any:
    """A dataclass field read by `parse_params` from `key` (default: the field's name).

    The kind follows the default (a bool is a true/false switch, a str is text) unless
    `choices` (one of these values), `integer` (an int, never a bool) or `text` (a non-empty
    string, of `length` characters if given) say otherwise; a number is any finite int or
    float that is not a bool. `minimum` and `positive` bound numbers. A default of None makes
    the key optional: None then means "not set". `expects` replaces the generated words of a
    refusal; `show_value=False` leaves the refused value out of it.
    """
    rule = ParamRule(key=key, kind=_kind(default, choices, integer, text),
                     choices=tuple(choices or ()), minimum=minimum, positive=positive,
                     length=length, expects=expects, show_value=show_value)
    return dataclasses.field(default=default, metadata={PARAM: rule})


def _declared(cls: type) -> list[tuple[dataclasses.Field, str, ParamRule]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    out = []
    for f in dataclasses.fields(cls):
        rule = f.metadata.get(PARAM)
        if rule is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with param()")
        out.append((f, rule.key or f.name, rule))
    return out


def param_keys(cls: type) -> frozenset[str]:
    """The keys `parse_params(cls, ...)` reads."""
    return frozenset(key for _f, key, _rule in _declared(cls))


def param_defaults(cls: type) -> dict[str, Any]:
    """key -> default value, for every key of `cls`."""
    return {key: f.default for f, key, _rule in _declared(cls)}


def check_value(key: str, rule: ParamRule, value: Any) -> None:
    """InputError "<key> must be <expectation>, got <value>" unless `rule` accepts `value`."""
    if not rule.accepts(value):
        got = f", got {value!r}" if rule.show_value else ""
        raise InputError(f"{key} must be {rule.expectation()}{got}")


def parse_params(cls: Callable[..., T], params: Mapping[str, Any]) -> T:
    """`cls` from the keys it declares in `params` (absent keys take their defaults), checked
    in the order the fields are declared: the first bad value is the one refused."""
    values = {}
    for f, key, rule in _declared(cls):  # type: ignore[arg-type]
        value = params.get(key, f.default)
        if not (value is None and f.default is None):
            check_value(key, rule, value)
        values[f.name] = value
    return cls(**values)


__all__ = ["ParamRule", "check_value", "param", "param_defaults", "param_keys", "parse_params"]
