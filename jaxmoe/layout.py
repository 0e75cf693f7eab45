"""The layout interface: what every layout does, whatever kind it is.

A `Layout` is a value (an SPMD rule table over one mesh, a pipeline schedule, attention and
experts on two sub-meshes): it checks a config, names its meshes and least traffic, and lays a
model out on devices. What it lays out is a `LaidOut`: it places parameters, runs the forward
pass, builds the decoder and the trainer, and compiles each phase's programs to say what they
cost. Library code and the CLI call these and never ask which kind of layout they hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import jax
import numpy as np

from jaxmoe.analysis.collectives import Inventory
from jaxmoe.config import ModelConfig

if TYPE_CHECKING:
    from jaxmoe.analysis.hardware import Hardware
    from jaxmoe.estimate import Estimate
    from jaxmoe.inference import Decoder
    from jaxmoe.phases import Measure, PhaseCost
    from jaxmoe.sharding import Strategy
    from jaxmoe.train.recipe import TrainConfig

Phase = Literal["forward", "train", "prefill", "decode"]
PHASES: tuple[Phase, ...] = ("forward", "train", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """What the compiled program(s) of one phase do under a layout.

    `inventory` holds every collective of one call; `per_layer` those of the layer loop per layer,
    kind -> (count, bytes one device sends). For the training step, `per_layer` is the whole
    step's divided by the layers (the gradient reductions may sit outside the loop).
    `memory` is bytes per device by part; `details` a layout's own figures (per sub-mesh, the
    transfers between them); `gap` says why the program sends more than the minimum where the
    layout knows and has not closed it, `gap_bytes_per_layer` by how much.
    """

    strategy: str
    mesh: dict
    phase: Phase
    inventory: Inventory
    per_layer: dict[str, tuple[float, float]]
    minimum_bytes_per_layer: float
    bubble_fraction: float  # share of a pipeline schedule's iterations a stage idles (0: none)
    param_bytes_per_device: int
    param_bytes_total: int
    memory: dict[str, int]
    details: dict | None = None
    # why the program sends more than the minimum where the layout knows and has not closed it,
    # and by how much per layer per device ("" and 0: it does not)
    gap: str = ""
    gap_bytes_per_layer: float = 0.0


class LaidOut(Protocol):
    """A model config laid out by a layout on concrete devices."""

    cfg: ModelConfig

    def put(self, state: Any) -> Any:
        """The model's parameters (made on one device) in this layout."""

    def abstract_params(self) -> Any:
        """The parameters as abstract arrays with this layout's shardings."""

    def run_forward(self, params: Any, tokens: Any) -> tuple[np.ndarray, ProgramCost]:
        """Logits [B, S, V] (float32, on the host) of `params` as `put` gives them, and what
        the forward pass's programs do."""

    def cost(self, phase: Phase) -> ProgramCost:
        """What `phase`'s programs do, compiled on abstract inputs (nothing run)."""

    def phase_cost(self, phase: Phase, hw: Hardware, measure: Measure | None) -> PhaseCost:
        """Prefill or decode: the bound on `hw`, memory per device, measured times if asked."""

    def decoder(self) -> Decoder:
        """Greedy generation's two phases, for `inference.generate`."""

    def trainer(self, tc: TrainConfig) -> Any:
        """The `Trainer` interface: init, step, evaluate, abstract_state, batch_sharding, and the
        checkpoints' form every layout shares (abstract_saved, to_saved, from_saved)."""

    def explain(self, phase: Phase) -> dict:
        """Per parameter its logical axes, spec and bytes per device; the collectives; memory."""


class Layout(Protocol):
    """Where a model runs: one or more meshes, their rules, and what traffic they should cost."""

    name: str
    description: str

    @property
    def n_devices(self) -> int:
        """Devices the layout uses."""

    @property
    def mesh(self) -> dict:
        """Mesh axis sizes (`{"tensor": 16}`), or per sub-mesh (`{"attention": {...}, ...}`)."""

    @property
    def strategies(self) -> Mapping[str, Strategy]:
        """The rule table laid on each mesh, by the mesh's role."""

    def check(self, cfg: ModelConfig, n_devices: int | None = None) -> None:
        """One-line ConfigError for anything this layout cannot run on `n_devices`."""

    def check_devices(self, n_devices: int) -> None:
        """One-line ConfigError when the layout cannot run on `n_devices` devices in all."""

    def variants(self, cfg: ModelConfig) -> list[tuple[ModelConfig, str]]:
        """The configs this layout could run `cfg` as, preferred first, each with the layout's
        name for it (a separation may take fewer micro-batches)."""

    def minimum_bytes(self, cfg: ModelConfig) -> dict[str, float]:
        """The least bytes one device must send per layer in the forward pass over cfg's batch,
        `{"dense": ..., "moe": ...}`, for where the layout puts parameters and activations, each
        exchange by its best standard collective (ring all-reduce, all-gather, all-to-all,
        point-to-point), derived from the layout alone; a pipeline's idle iterations are not
        counted (`minimum_per_layer` has the other phases). What a training step adds: "vocab",
        the embedding's, the LM head's and the loss's exchanges per step, and "moe_backward",
        what an MoE layer's backward pass sends beyond its forward pass's transpose."""

    def bubble_fraction(self, cfg: ModelConfig) -> float:
        """Share of a pipeline schedule's iterations a stage idles (0 without one)."""

    def estimate(self, cfg: ModelConfig, hw: Hardware, phase: str) -> Estimate | None:
        """The phase's cost from the layout's rules alone, nothing compiled (`jaxmoe.estimate`);
        None where the layout has no such estimate (`plan` then always compiles it)."""

    def lay_out(self, cfg: ModelConfig, devices: Sequence[jax.Device]) -> LaidOut:
        """Check `cfg` (one-line ConfigError) and lay it out on `devices`."""


def decode_step(cfg: ModelConfig) -> tuple[ModelConfig, float]:
    """A decode step as a forward pass: (a config whose forward pass routes and moves what the
    step does, the share of it the step is). The batch's new tokens in routing groups of
    `decode_group` are seen as sequences of two such groups (a sequence has two tokens or
    more), of which the step is half."""
    g = cfg.decode_group
    return cfg.replace(batch=cfg.batch // g, seq_len=2 * g, moe_group_size=g), 0.5


def minimum_per_layer(
    cfg: ModelConfig, layout: Layout, phase: Phase = "forward", gradient_bytes: float = 0.0
) -> float:
    """Mean over layers of the least bytes a device must send in `phase`: the forward pass's
    (prefill's: the same layers over the prompt), a decode step's (its one new token a
    sequence), or a training step's: twice the forward pass's (each collective's transpose
    moves as much), what the MoE layers' backward passes add, the embedding's, LM head's and
    loss's exchanges, and `gradient_bytes`, the step's gradient reductions."""
    step, share = decode_step(cfg) if phase == "decode" else (cfg, 1.0)
    volume = layout.minimum_bytes(step)
    forward = share * (cfg.n_dense_layers * volume["dense"] + cfg.n_moe_layers * volume["moe"])
    if phase == "train":
        backward = forward + cfg.n_moe_layers * volume["moe_backward"]
        return (forward + backward + volume["vocab"] + gradient_bytes) / cfg.n_layers
    return forward / cfg.n_layers


def per_layer(inv: Inventory, n_layers: int, *, in_loop: bool | None = True) -> dict:
    """Collectives (inside the layer loop, or all with `in_loop=None`) per layer:
    kind -> (count, bytes per device)."""
    return {
        k: (t.count / n_layers, t.bytes / n_layers) for k, t in inv.by_kind(in_loop=in_loop).items()
    }
