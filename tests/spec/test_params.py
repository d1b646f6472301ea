"""spec/params.py: which params show in their prompt (an empty demos block does not) and the role
shown for a param whose spec gives none."""
from __future__ import annotations

import pytest

from autodiff_cli.spec.models import ParamSpec
from autodiff_cli.spec.params import DEMOS_ROLE, default_role, in_prompt


def test_an_empty_demos_block_is_not_part_of_its_prompt():
    assert in_prompt(ParamSpec(kind="demos", value=""), "") is False


@pytest.mark.parametrize("kind, value", [("demos", "Q: 2 apples\nA: 2"), ("prompt", "Count."), ("prompt", "")])
def test_every_other_param_is_part_of_its_prompt(kind, value):
    # a prompt param shows even when empty (the optimizer may write one); demos show once filled
    assert in_prompt(ParamSpec(kind=kind, value=""), value) is True


def test_the_value_given_decides_not_the_specs_initial_value():
    # the spec's value is the initial one; training passes the current value
    filled_spec = ParamSpec(kind="demos", value="Q: 1\nA: 1")
    assert in_prompt(filled_spec, "") is False
    assert in_prompt(ParamSpec(kind="demos"), "Q: 1\nA: 1") is True


def test_default_roles():
    assert default_role(ParamSpec()) == "prompt"  # a param is a prompt unless it says otherwise
    assert default_role(ParamSpec(kind="prompt", role="task instruction")) == "prompt"  # the default, not its role
    assert default_role(ParamSpec(kind="demos")) == DEMOS_ROLE
    assert "demonstrations" in DEMOS_ROLE
