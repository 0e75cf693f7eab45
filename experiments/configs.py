"""`--config NAME` for every command: a library preset, or a paper's experiment (its tiny model,
the one that runs on a CPU; `experiment NAME --scale full` compiles the full one)."""

from jaxmoe.config import PRESETS, ConfigError, ModelConfig, preset


def config(name: str) -> ModelConfig:
    from experiments.papers.registry import EXPERIMENTS  # the paper modules build configs

    if name in EXPERIMENTS:
        return EXPERIMENTS[name].tiny
    if name in PRESETS:
        return preset(name)
    choices = ", ".join([*sorted(PRESETS), *EXPERIMENTS])
    raise ConfigError(f"unknown config {name!r}; choose one of {choices}")
