"""The public API: names, version, and documented examples."""

import inspect
import re

import pytest

import jaxaccum

CONTRACT = ("value_and_grad", "grad", "multi_steps", "MultiStepsState", "has_updated")


def test_contract_names_are_public():
  for name in CONTRACT:
    assert name in jaxaccum.__all__, name


def test_all_names_exist():
  assert len(set(jaxaccum.__all__)) == len(jaxaccum.__all__)
  for name in jaxaccum.__all__:
    assert hasattr(jaxaccum, name), name


def test_dir_lists_the_public_names_and_no_stray_modules():
  assert "nnx" in jaxaccum.__all__
  names = dir(jaxaccum)
  public = {name for name in names if not name.startswith("_")}
  assert public == set(jaxaccum.__all__), public ^ set(jaxaccum.__all__)
  for name in names:
    value = getattr(jaxaccum, name)
    if inspect.ismodule(value):  # only jaxaccum's own modules, never os or importlib
      assert value.__name__.startswith("jaxaccum."), (name, value)


def test_version():
  assert isinstance(jaxaccum.__version__, str)
  assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", jaxaccum.__version__)


@pytest.mark.parametrize("name", sorted(jaxaccum.__all__))
def test_public_symbol_has_a_docstring_with_an_example(name):
  doc = inspect.getdoc(getattr(jaxaccum, name))
  assert doc, f"{name} has no docstring"
  assert ">>>" in doc, f"{name}'s docstring has no >>> example"


def test_multi_steps_state_fields():
  fields = jaxaccum.MultiStepsState._fields
  for field in ("mini_step", "gradient_step", "inner_opt_state", "acc_grads"):
    assert field in fields
