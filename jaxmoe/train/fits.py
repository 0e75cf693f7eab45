"""Will a training run fit? Its state (parameters and Adam's moments, laid out as the trainer
lays them) against each device's memory and one checkpoint against the work directory's disk,
checked from abstract shapes before anything is allocated or compiled."""

import collections
import math
import shutil
from pathlib import Path

import jax

from jaxmoe.config import ConfigError
from jaxmoe.memory_check import device_memory_bytes, host_memory_bytes


def check_disk(workdir: Path, abstract_state) -> None:
    """Refuse to start when the work directory's disk cannot take one checkpoint (counted
    uncompressed: orbax compresses what compresses, which a trained state mostly does not)."""
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise ConfigError(
            f"--workdir {workdir}: a checkpoint takes up to {_mib(need)} but its disk has "
            f"{_mib(free)} free; free space, or use a --workdir on another disk"
        )


def check_memory(abstract_state) -> None:
    """Refuse to start when the state alone exceeds a device's memory (CPU devices share the
    host's, so there it is their sum against the host's). Activations come on top: a run that
    passes may still not fit, one refused here cannot."""
    per_device: collections.Counter = collections.Counter()
    for x in jax.tree.leaves(abstract_state):
        shard = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for device in x.sharding.addressable_devices:
            per_device[device] += shard
    if not per_device:
        return
    if all(d.platform == "cpu" for d in per_device):
        need, have = sum(per_device.values()), host_memory_bytes()
        if have is not None and need > have:
            raise ConfigError(
                f"parameters and optimizer state take {_mib(need)} on this host's "
                f"{len(per_device)} CPU devices but it has {_mib(have)} of memory; choose a "
                f"smaller model (--set), or spread the devices over more hosts (--num-processes)"
            )
        return
    fix = "use a layout that splits the model over more devices, or a smaller model (--set)"
    for device, need in per_device.items():
        have = device_memory_bytes(device)
        if have is not None and need > have:
            raise ConfigError(
                f"parameters and optimizer state take {_mib(need)} on {device} but it has "
                f"{_mib(have)}; {fix}"
            )


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"
