"""jaxmoe: lay dense and Mixture-of-Experts transformers over many accelerators and read, from the
compiled program, what each layout costs.

    import jaxmoe

    result = jaxmoe.compare("tiny_moe", ["tp16", "ep16"])   # run, against one device
    print(result.table())
    print(jaxmoe.explain("tiny_moe", "ep16", phase="train").text())
    print(jaxmoe.plan("paper000", "h100x16").table())

Every result is a frozen dataclass with `to_json()`. Importing jaxmoe starts no JAX backend:
choose the platform and devices first where it matters (`jaxmoe.platform`). The functions below
are the API (`jaxmoe.api`); where one shares its name with a module (`compare`, `explain`, `plan`,
`experiment`, `train`), `jaxmoe.NAME` is the function and `from jaxmoe.NAME import ...` the module.
"""

from jaxmoe.api import (
    Comparison,
    ExperimentResult,
    Explanation,
    Plan,
    TrainResult,
    bound,
    compare,
    config,
    experiment,
    experiments,
    explain,
    hardware,
    layout,
    layouts,
    plan,
    train,
)
from jaxmoe.config import Architecture, ModelConfig, Workload
from jaxmoe.phases import Measure
from jaxmoe.train.loop import RunOptions
from jaxmoe.train.recipe import TrainConfig, recipe

__all__ = [
    "Architecture",
    "Comparison",
    "ExperimentResult",
    "Explanation",
    "Measure",
    "ModelConfig",
    "Plan",
    "RunOptions",
    "TrainConfig",
    "TrainResult",
    "Workload",
    "bound",
    "compare",
    "config",
    "experiment",
    "experiments",
    "explain",
    "hardware",
    "layout",
    "layouts",
    "plan",
    "recipe",
    "train",
]
