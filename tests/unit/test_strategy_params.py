"""A strategy parameter given to the wrong strategy is refused naming the strategy that reads it."""

from __future__ import annotations

import pytest

from fedseg.errors import InputError
from fedseg.federation.strategies import get_strategy


@pytest.mark.parametrize("strategy, key, owner", [
    ("fedavg", "group.site_a", "flames"),
    ("local", "memory_size", "mixmfl"),
    ("flames", "sam.config", "fedmsa, fedsam"),
])
def test_wrong_strategy_parameter_names_its_owner(strategy: str, key: str, owner: str) -> None:
    with pytest.raises(InputError, match=f"is a parameter of strategy {owner}, not of '{strategy}'"):
        get_strategy(strategy).check_params({key: "1"})

