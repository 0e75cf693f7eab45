"""Attention/expert separation: attention and experts on two disjoint sub-meshes (paper 001)."""

from jaxmoe.separation.layout import Separation
from jaxmoe.separation.params import SepParams
from jaxmoe.separation.runner import INTER_MESH, Separated
from jaxmoe.separation.timeline import Overlap, Timeline

__all__ = ["INTER_MESH", "Overlap", "SepParams", "Separated", "Separation", "Timeline"]
