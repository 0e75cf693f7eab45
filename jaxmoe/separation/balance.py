"""The balancer on a separated layout: measure each side's piece, fit the predictor, choose.

`measure_pieces` times one micro-batch's attention piece and expert piece alone (each call
blocked on), giving the `balancer.Sample`s the paper's predictor is fitted on; `overlap` runs
whole forward passes under a `Timeline`, issued asynchronously (ping-pong) or one program at a
time (`serial`), to show what the overlap saves.
"""

from __future__ import annotations

import jax

from jaxmoe.balancer import Sample
from jaxmoe.separation.programs import send
from jaxmoe.separation.runner import Separated
from jaxmoe.separation.timeline import Overlap, Timeline
from jaxmoe.timer import time_calls


def measure_pieces(run: Separated, params, *, warmup: int = 1, iters: int = 5) -> Sample:
    """Seconds of one micro-batch's attention piece and expert piece (the first block's), each
    run alone: the predictor's training sample for this device split and micro-batch size."""
    cfg, prog = run.cfg, run.programs
    shape = (run.rows, cfg.seq_len, cfg.d_model)
    states = jax.random.normal(jax.random.key(0), shape, cfg.compute_dtype)
    sent = send(states, run.sep.transfer_bits)
    x, y = jax.device_put(states, run.residual), jax.device_put(sent, run.exit)
    h = jax.device_put(sent, run.at_experts)
    attn = time_calls(
        lambda: prog.attend(params.attention[0], x, y, None, 0)[0], warmup=warmup, iters=iters
    )
    experts = time_calls(
        lambda: prog.experts(params.experts[0], h, None, 0)[0], warmup=warmup, iters=iters
    )
    return Sample(
        tokens=run.rows * cfg.seq_len,
        attn_devices=run.sep.attention.n_devices,
        expert_devices=run.sep.experts.n_devices,
        attn_s=attn.median,
        expert_s=experts.median,
    )


def overlap(run: Separated, params, tokens, *, serial: bool = False, repeats: int = 3) -> Overlap:
    """The forward pass's timeline (the last of `repeats`, the first ones warming up): busy time
    per mesh and their overlap; `serial` waits for every program before issuing the next."""
    for _ in range(repeats):
        with Timeline() as timeline:
            run.forward(params, tokens, timeline=timeline, serial=serial)  # waits for the logits
    return timeline.overlap()
