"""The one option checker: what passes, and errors that name the option, the expectation and the value."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from flwr_serverless.errors import StoreConfigurationError
from flwr_serverless.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_number,
    check_positive,
    check_positive_int,
)


def test_valid_values_come_back_converted() -> None:
    assert check_positive_int("n", np.int64(3)) == 3 and type(check_positive_int("n", np.int64(3))) is int
    assert check_int("k", 0, 0, 5) == 0 and check_int("k", 5, 0, 5) == 5
    assert check_positive("t", 2) == 2.0 and check_fraction("p", 1) == 1.0
    assert check_number("mu", 0, 0.0) == 0.0 and check_number("s", 1.0, 0.0, 1.0) == 1.0
    assert check_choice("mode", "a", ("a", "b")) == "a" and check_bool("flag", False) is False
    for check in (check_positive_int, check_positive, check_fraction, check_bool):
        assert check("x", None, none=True) is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_positive_int("num_nodes", 0), "num_nodes must be a positive integer, got 0"),
        (lambda: check_positive_int("num_nodes", True), "num_nodes must be a positive integer, got True"),
        (lambda: check_positive_int("steps", 2.5, none=True), "steps must be a positive integer or None, got 2.5"),
        (lambda: check_positive_int("n", None), "n must be a positive integer, got None"),
        (lambda: check_int("min_nodes", 3, 1, 2), "min_nodes must be an integer in [1, 2], got 3"),
        (lambda: check_int("k", -1, 0), "k must be an integer >= 0, got -1"),
        (lambda: check_positive("timeout", 0, unit="seconds"), "timeout must be a positive number of seconds, got 0"),
        (lambda: check_positive("lr", math.inf), "lr must be a positive number, got inf"),
        (lambda: check_positive("lr", "1"), "lr must be a positive number, got '1'"),
        (lambda: check_fraction("alpha", 0.0), "alpha must be in (0, 1], got 0.0"),
        (lambda: check_fraction("alpha", math.nan), "alpha must be in (0, 1], got nan"),
        (lambda: check_number("mu", -0.1, 0.0), "mu must be >= 0, got -0.1"),
        (lambda: check_number("skew", 1.5, 0.0, 1.0), "skew must be in [0, 1], got 1.5"),
        (lambda: check_choice("engine", "x", ("local", "ray")), "engine must be one of local, ray, got 'x'"),
        (lambda: check_bool("eval", 1), "eval must be True or False, got 1"),
    ],
)
def test_errors_name_the_option_what_was_expected_and_what_came(call: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        call()
    assert str(caught.value) == message


def test_the_error_class_can_be_chosen() -> None:
    with pytest.raises(StoreConfigurationError, match="map_reads must be True, False or None"):
        check_bool("map_reads", "yes", none=True, error=StoreConfigurationError)
