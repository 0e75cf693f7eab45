"""The five source papers as experiments: each paper's model at full size (as the paper states
it) and a tiny version that runs on a laptop CPU, the strategies it compares, the hardware it ran
on, and the figures it claims (to be checked against the hardware's bound, never trusted).

Names follow the papers' files in ../shared/papers: `paper000` ... `paper004`, one module each;
`registry.get(name)` returns one.
"""

from jaxmoe.experiment import Claim, Experiment, shrink

__all__ = ["Claim", "Experiment", "shrink"]
