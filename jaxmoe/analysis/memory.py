"""Per-device memory of a compiled program, from XLA's memory analysis."""

from __future__ import annotations

from typing import Any


def memory_per_device(compiled: Any) -> dict[str, int]:
    """Bytes per device of a `jax.stages.Compiled`: arguments, outputs, temporaries, aliased
    (outputs sharing an argument's buffer), generated code, and their total."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise ValueError("this backend gives no memory analysis for the compiled program")
    sizes = {
        "arguments": int(stats.argument_size_in_bytes),
        "outputs": int(stats.output_size_in_bytes),
        "temporaries": int(stats.temp_size_in_bytes),
        "aliased": int(stats.alias_size_in_bytes),
        "generated_code": int(stats.generated_code_size_in_bytes),
    }
    sizes["total"] = (
        sizes["arguments"]
        + sizes["outputs"]
        + sizes["temporaries"]
        - sizes["aliased"]
        + sizes["generated_code"]
    )
    return sizes
