"""one_device: the whole model on one device, the reference every layout is measured against
(not in the registry of 16-device strategies)."""

from jaxmoe.sharding import Strategy
from meshes.axes import MeshAxis

STRATEGY = Strategy(
    name="one_device",
    mesh_shape=((MeshAxis.TENSOR, 1),),
    rules={},
    description="everything on one device",
    minimum_bytes=lambda cfg: dict.fromkeys(("dense", "moe", "vocab", "moe_backward"), 0.0),
)
