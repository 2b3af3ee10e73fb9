"""The public API: names, version, and documented examples."""

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

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


def test_flax_is_an_extra_not_a_dependency():
  tomllib = pytest.importorskip("tomllib")
  project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
  project = project["project"]
  name = lambda requirement: re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)  # noqa: E731
  assert sorted(map(name, project["dependencies"])) == ["jax", "optax"]
  extras = project["optional-dependencies"]
  for extra in ("flax", "dev", "examples"):  # the README's commands install flax
    assert "flax" in map(name, extras[extra]), extra


def test_flax_adapters_name_the_extra_without_flax(monkeypatch):
  for module in ("jaxaccum.nnx", "jaxaccum._flax.nnx_args", "jaxaccum._flax.loss_scale",
                 "jaxaccum.linen"):
    monkeypatch.delitem(sys.modules, module, raising=False)
  monkeypatch.setitem(sys.modules, "flax", None)  # what Python does for a missing package
  for module in ("jaxaccum.nnx", "jaxaccum.linen"):
    with pytest.raises(ImportError, match=re.escape("pip install 'jaxaccum[flax]'")):
      importlib.import_module(module)


@pytest.mark.slow
def test_the_core_works_without_flax():
  code = """
import sys
sys.modules["flax"] = None
import jax.numpy as jnp, optax, jaxaccum
w = jnp.float32(2.0)
loss, grads = jaxaccum.value_and_grad(lambda w, x: jnp.mean(x * w), num_microbatches=2)(
    w, jnp.arange(4.0))
ms = jaxaccum.multi_steps(optax.sgd(1.0), 2)
ms.update(grads, ms.init(w), w)
assert [m for m in sys.modules if m.split(".")[0] == "flax" and sys.modules[m]] == []
try:
  jaxaccum.nnx
except ImportError as e:
  assert "jaxaccum[flax]" in str(e), e
else:
  raise AssertionError("jaxaccum.nnx imported without flax")
"""
  subprocess.run([sys.executable, "-c", code], check=True)
