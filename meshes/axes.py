"""Mesh axis names, defined once for every strategy."""

from enum import StrEnum


class MeshAxis(StrEnum):
    DATA = "data"
    FSDP = "fsdp"
    TENSOR = "tensor"
    PIPE = "pipe"
    EXPERT = "expert"
    HEADS = "heads"
    DIMS = "dims"
    REPLICA = "replica"
    SLICE = "slice"
