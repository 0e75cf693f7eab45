"""What a separated layout costs: its pieces compiled on abstract inputs, their roofline bounds
composed into the bound of a whole call, and memory per device on each mesh.

One call runs, per micro-batch, the embedding and the LM head on the attention mesh and, per block,
attention (attention mesh), a transfer, experts (expert mesh) and a transfer back. Each piece's
bound comes from its compiled program (`roofline.program_bound`); transfers are timed on the links
between the meshes' GPUs (`Hardware.transfer_seconds`). Composed:

- serial: every piece one after another (nothing overlapped, each piece's own serial bound);
- overlapped: the largest of what each resource must do in all (attention mesh, expert mesh,
  links), each plus the least the others must do before it can start and after it ends, and the
  chain one micro-batch must go through alone (ping-pong hides nothing of it).

At decode every micro-batch's expert piece reads all the expert weights again: with more
micro-batches the expert mesh's total grows, and the bound says when splitting costs more than it
hides.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxmoe.analysis.collectives import Inventory, inventory
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.analysis.memory import memory_per_device
from jaxmoe.analysis.roofline import Bound, program_bound
from jaxmoe.model import KV
from jaxmoe.placement import shard_bytes
from jaxmoe.separation.runner import Separated


def _like(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def crossing(run: Separated, shape: tuple, sharding) -> object:
    """Abstract [rows, S, D] states as they cross between the meshes (quantised or not)."""
    if run.sep.transfer_bits:
        return (
            _like(shape, jnp.int8, sharding),
            _like((*shape[:-1], 1), jnp.float32, sharding),
        )
    return _like(shape, run.cfg.compute_dtype, sharding)


def compile_pieces(run: Separated, phase: str) -> dict[str, jax.stages.Compiled]:
    """The programs one call of `phase` runs, each compiled once on abstract inputs: `embed`,
    `attend` (a block after the first), `experts` and `head`, for one micro-batch."""
    cfg, prog = run.cfg, run.programs
    params = run.abstract_params()
    seq = 1 if phase == "decode" else cfg.seq_len
    shape = (run.rows, seq, cfg.d_model)
    x = _like(shape, cfg.compute_dtype, run.residual)
    y = crossing(run, shape, run.exit)
    h = crossing(run, shape, run.at_experts)
    tokens = _like((run.rows, seq), jnp.int32, run.tokens)
    pos = jax.ShapeDtypeStruct((), jnp.int32)
    cache = None
    if phase != "forward":
        one = _like(run.kv_shape(), cfg.compute_dtype, run.cache_sharding)
        cache = tuple(KV(one, one) for _ in range(cfg.layers_per_block))
    head = prog.logits if phase == "forward" else prog.last_logits
    return {
        "embed": prog.embed.lower(params.outer, tokens, pos).compile(),
        "attend": prog.attend.lower(params.attention[0], x, y, cache, pos).compile(),
        "experts": prog.experts.lower(params.experts[0], h, None, 0).compile(),
        "head": head.lower(params.outer, x, y).compile(),
    }


@dataclasses.dataclass(frozen=True)
class SeparatedBound:
    """Seconds per call, composed from the pieces' bounds (see the module docstring)."""

    pieces: dict[str, Bound]  # per micro-batch: embed, attend (per block), experts, head
    transfer_s: dict[str, float]  # per micro-batch and block: to_experts, to_attention, fanout
    blocks: int
    micro_batches: int

    def _totals(self, serial: bool) -> dict[str, float]:
        n, m = self.blocks, self.micro_batches
        t = {k: (b.serial_s if serial else b.overlapped_s) for k, b in self.pieces.items()}
        link = sum(self.transfer_s.values())
        return {
            "attention": m * (t["embed"] + n * t["attend"] + t["head"]),
            "experts": n * m * t["experts"],
            "links": n * m * link,
            "chain": t["embed"] + n * (t["attend"] + link + t["experts"]) + t["head"],
            "first": t["embed"] + t["attend"] + self.transfer_s["to_experts"],
            "last": self.transfer_s["to_attention"] + self.transfer_s["fanout"] + t["head"],
            "expert_piece": t["experts"],
            "attend_piece": t["attend"],
        }

    def _paths(self) -> dict[str, float]:
        t = self._totals(serial=False)
        return {
            "attention mesh": t["attention"] + t["expert_piece"],
            "expert mesh": t["first"] + t["experts"] + t["last"],
            "links": t["links"] + t["attend_piece"] + t["expert_piece"],
            "one micro-batch's chain": t["chain"],
        }

    @property
    def overlapped_s(self) -> float:
        return max(self._paths().values())

    @property
    def serial_s(self) -> float:
        t = self._totals(serial=True)
        return t["attention"] + t["experts"] + t["links"]

    @property
    def limit(self) -> str:
        paths = self._paths()
        which = max(paths, key=paths.get)
        piece = {"attention mesh": "attend", "expert mesh": "experts"}.get(which)
        return f"{which}: {self.pieces[piece].limit}" if piece else which

    def summary(self) -> dict:
        totals = self._totals(serial=False)
        return {
            "overlapped_s": self.overlapped_s,
            "serial_s": self.serial_s,
            "limit": self.limit,
            "attention_mesh_s": totals["attention"],
            "expert_mesh_s": totals["experts"],
            "links_s": totals["links"],
            "paths_s": self._paths(),
            "micro_batches": self.micro_batches,
            "pieces": {k: b.summary() for k, b in self.pieces.items()},
            "transfer_s_per_piece": self.transfer_s,
        }


def separated_bound(
    run: Separated, pieces: dict[str, jax.stages.Compiled], hw: Hardware, phase: str
) -> SeparatedBound:
    cfg, sep = run.cfg, run.sep
    a, x = sep.attention.n_devices, sep.experts.n_devices
    attention_devices, expert_devices = range(a), range(a, a + x)
    sizes = {"attention": sep.attention.axis_sizes, "experts": sep.experts.axis_sizes}
    bounds = {
        name: program_bound(
            c,
            sizes["experts" if name == "experts" else "attention"],
            hw,
            cfg.dtype,
            first_device=a if name == "experts" else 0,
        )
        for name, c in pieces.items()
    }
    tokens = run.rows * (1 if phase == "decode" else cfg.seq_len)
    size = sep.transfer_bytes(cfg, tokens)
    slice_size = a // sep.slices  # attention devices per block of the crossing states
    landing = range(0, a, slice_size)
    transfers = {
        "to_experts": hw.transfer_seconds(size, attention_devices, expert_devices),
        "to_attention": hw.transfer_seconds(size, expert_devices, landing),
        "fanout": max(
            (
                hw.transfer_seconds(size / sep.slices, [d], range(d + 1, d + slice_size))
                for d in landing
                if slice_size > 1
            ),
            default=0.0,
        ),
    }
    return SeparatedBound(bounds, transfers, cfg.n_blocks, cfg.micro_batches)


EXPERT_PIECES = ("experts", "expert_grads", "router", "update_experts")  # the rest: attention


def calls(run: Separated, phase: str) -> dict[str, int]:
    """How often one call of `phase` runs each piece. The forward pass and inference count the
    blocks' pieces only (attention, experts: the layers); a training step counts every piece."""
    m, n = run.cfg.micro_batches, run.cfg.n_blocks
    blocks = {"attend": m * n, "experts": m * n}
    if phase != "train":
        return blocks
    grads = {"attend_grads": m * n, "expert_grads": m * n}
    once = {"router": 1, "update_attention": 1, "update_experts": 1}
    return blocks | grads | once | {"embed": m, "head_grads": 1, "embed_grads": 1}


def mesh_inventories(
    run: Separated, pieces: dict[str, jax.stages.Compiled], counts: dict[str, int] | None = None
) -> dict[str, Inventory]:
    """The collectives one call issues, per mesh (`attention`, `experts`): each piece's, times
    the calls made of it (`counts`; default: a forward pass's blocks)."""
    counts = calls(run, "forward") if counts is None else counts
    found = {"attention": [], "experts": []}
    for piece, times in counts.items():
        mesh = "experts" if piece in EXPERT_PIECES else "attention"
        strategy = run.sep.experts if mesh == "experts" else run.sep.attention
        inv = inventory(pieces[piece].as_text(), strategy.axis_sizes)
        found[mesh] += [
            dataclasses.replace(c, executions=c.executions * times) for c in inv.collectives
        ]
    return {mesh: Inventory(tuple(c)) for mesh, c in found.items()}


def like(compiled: jax.stages.Compiled, index: int):
    """Abstract arrays shaped and laid out like output `index` of a compiled piece."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        compiled.out_info[index],
    )


def cache_bytes(run: Separated) -> int:
    """KV cache bytes per attention device: every layer and micro-batch, keys and values."""
    cfg = run.cfg
    one = _like(run.kv_shape(), cfg.compute_dtype, run.cache_sharding)
    return 2 * shard_bytes(one) * cfg.layers_per_block * cfg.n_blocks * cfg.micro_batches


@dataclasses.dataclass(frozen=True)
class MeshMemory:
    """Bytes per device on one mesh."""

    parameters: int
    cache: int  # KV cache, all blocks and micro-batches
    states: int  # the states kept between pieces (in training: every piece's saved inputs)
    temporaries: int  # the largest of the mesh's programs'
    gradients: int = 0  # training: one per parameter, laid out like it
    optimizer_state: int = 0  # training: AdamW's moments, laid out like the parameters

    @property
    def total(self) -> int:
        return sum(dataclasses.asdict(self).values())


@dataclasses.dataclass(frozen=True)
class SeparatedMemory:
    attention: MeshMemory
    experts: MeshMemory

    @property
    def total(self) -> int:
        """The busier mesh's."""
        return max(self.attention.total, self.experts.total)

    def training_parts(self) -> dict[str, int]:
        """The busier mesh's training memory as a strategy's: parameters, gradients,
        optimizer state, activations (saved states and temporaries), total."""
        part = max((self.attention, self.experts), key=lambda m: m.total)
        return {
            "parameters": part.parameters,
            "gradients": part.gradients,
            "optimizer_state": part.optimizer_state,
            "activations": part.states + part.temporaries,
            "total": part.total,
        }

    def to_json(self) -> dict[str, int]:
        """Flat: `attention_parameters`, ..., each mesh's total, and `total`."""
        out = {}
        for mesh in ("attention", "experts"):
            part = getattr(self, mesh)
            out |= {
                f"{mesh}_{k}": v
                for k, v in dataclasses.asdict(part).items()
                if v or k not in ("gradients", "optimizer_state")  # training's parts
            }
            out[f"{mesh}_total"] = part.total
        return out | {"total": self.total}

    def per_mesh_json(self) -> dict[str, int]:
        """What `explain` shows: each mesh's parts that are not zero."""
        out = {}
        for mesh in ("attention", "experts"):
            part = dataclasses.asdict(getattr(self, mesh))
            out |= {f"{mesh}_{k}": v for k, v in part.items() if v and k != "cache"}
        return out


def memory(
    run: Separated,
    pieces: dict[str, jax.stages.Compiled],
    phase: str,
    optimizer: tuple[int, int] = (0, 0),
) -> SeparatedMemory:
    """Bytes per device on each mesh: parameters, KV cache (all blocks and micro-batches), the
    states kept between pieces, and the largest temporaries of the mesh's programs; in training
    also gradients, the optimizer state (`optimizer`: bytes per device on each mesh) and every
    piece's saved inputs for the backward pass."""
    cfg, params = run.cfg, run.abstract_params()
    seq = 1 if phase == "decode" else cfg.seq_len
    states = (run.rows, seq, cfg.d_model)
    train = phase == "train"

    def kept(sharding, per_block: int):  # x and y per micro-batch, or h and y
        per = math.prod(sharding.shard_shape(states)) * cfg.compute_dtype.itemsize
        return (per_block * cfg.n_blocks if train else 2) * cfg.micro_batches * per

    def temporaries(mesh):
        names = [n for n in pieces if (n in EXPERT_PIECES) == (mesh == "experts")]
        return max(memory_per_device(pieces[n])["temporaries"] for n in names)

    held = {
        "attention": shard_bytes((params.outer, params.attention)),
        "experts": shard_bytes(params.experts),
    }
    return SeparatedMemory(
        MeshMemory(
            parameters=held["attention"],
            cache=0 if phase in ("forward", "train") else cache_bytes(run),
            states=kept(run.residual, 2),
            temporaries=temporaries("attention"),
            gradients=held["attention"] if train else 0,
            optimizer_state=optimizer[0],
        ),
        MeshMemory(
            parameters=held["experts"],
            cache=0,
            states=kept(run.at_experts, 1 if train else 2),
            temporaries=temporaries("experts"),
            gradients=held["experts"] if train else 0,
            optimizer_state=optimizer[1],
        ),
    )
