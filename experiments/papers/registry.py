"""The five papers' experiments by name."""

from experiments.papers import Experiment, paper000, paper001, paper002, paper003, paper004
from jaxmoe.config import ConfigError

EXPERIMENTS: dict[str, Experiment] = {
    m.EXPERIMENT.name: m.EXPERIMENT for m in (paper000, paper001, paper002, paper003, paper004)
}


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown paper {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
