"""``epi_jax.methods``, LoRA's and EWC's former home: a deprecated package whose ``lora`` and
``ewc`` still give every old name, the very objects of their new homes."""

import importlib
import warnings

import pytest

from epi_jax._src import ewc as ewc_penalty
from epi_jax.models import lora, lora_peft
from epi_jax.train.methods import ewc as ewc_method
from epi_jax.train.methods import lora as lora_method


def test_importing_the_old_package_warns():
  with pytest.deprecated_call(match="epi_jax.methods is deprecated"):
    importlib.reload(importlib.import_module("epi_jax.methods"))


@pytest.mark.parametrize(
    "old, homes",
    [
        ("lora", (lora, lora_peft, lora_method)),
        ("ewc", (ewc_penalty, ewc_method)),
    ],
)
def test_every_old_name_is_its_new_object(old, homes):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    module = importlib.import_module(f"epi_jax.methods.{old}")
  for name in module.__all__:
    new = [getattr(h, name) for h in homes if hasattr(h, name)]
    assert new and getattr(module, name) is new[0], name
