"""The package's docstring examples run as written and print what they show."""

import doctest

import pytest

import bnorm
import bnorm.torch


@pytest.mark.parametrize("module", [bnorm, bnorm.torch], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0
