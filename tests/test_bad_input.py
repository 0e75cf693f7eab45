"""Bad input and faults on the command line: one `error: ` line naming the cause and the fix, exit
code 2, no traceback, nothing printed, and all of it before anything is compiled (issue 14).

`CASES` is one table of (arguments, a needle the error line must contain) for every command.
In arguments, `{tmp}` is a fresh directory holding `afile` (a file) and `adir` (a directory).
"""

import json

import pytest

from jaxmoe.analysis.collectives import Inventory
from jaxmoe.compare import LayoutReport, check_finite
from jaxmoe.config import ConfigError, ModelConfig
from tests.forked_cli import run
from tests.test_cli import SMALL

HUGE = ["--set", "d_model=65536", "--set", "d_ff=262144", "--set", "n_layers=8"]  # 16 TiB
TINY = ["--config", "tiny_moe", *SMALL]
TRAIN_SMALL = ["--set=d_model=64", "--set=d_ff=128", "--set=head_dim=4", "--set=seq_len=32"]

CASES = [
    # compare: names, numbers, strategies, devices, seeds, output paths, memory
    (["--strategies", "nope"], "unknown strategy 'nope'"),
    (["--config", "nope"], "unknown config 'nope'"),
    (["--set", "n_layer=2"], "unknown field"),
    (["--set", "top_k=two"], "expected int"),
    (["--set", "n_layers"], "expected key=value"),
    (["--set", "top_k=40"], "top_k=40"),
    (["--set", "capacity_factor=0"], "capacity_factor=0.0"),
    (["--set", "dtype=float64"], "unknown dtype"),
    (["--set", "moe_group_size=5"], "must divide seq_len=16"),
    (["--set", "init_std=nan"], "init_std=nan: must be a finite number"),
    (["--set", "capacity_factor=inf"], "capacity_factor=inf: must be a finite number"),
    (["--set", "norm_eps=-1"], "norm_eps=-1.0: must be > 0"),
    (["--set", "expert_dropout=nan"], "expert_dropout=nan"),
    (["--set", "router_aux_coef=inf"], "router_aux_coef=inf"),
    (["--set", "router_z_coef=-1"], "router_z_coef=-1.0: a loss weight must be >= 0"),
    (["--set", "batch=-3"], "batch=-3: must be a positive integer"),
    (["--set", "seq_len=1"], "seq_len=1: must be at least 2"),
    (["--strategies", "tp16", "--set", "n_heads=12"], "splits n_heads=12"),
    (["--strategies", "ep16", "--set", "n_experts=24"], "splits n_experts=24"),
    (["--strategies", "heads_dims_4x4", "--set", "batch=6"], "splits batch=6"),
    (["--set", "batch=3", "--set", "n_heads=3"], "none of 6 layouts can split tiny_moe, e.g."),
    (["--strategies", "tp8_pp2", "--set", "micro_batches=3"], "micro_batches=3"),
    (["--strategies", "tp8_pp2", "--set", "n_layers=3"], "n_layers=3"),
    (["--strategies", ""], "--strategies '' is empty"),
    (["--strategies", "ep16,tp16,ep16"], "names ep16 twice"),
    (["--strategies", "ma_separation:16+4"], "16 attention + 4 expert devices exceed"),
    (["--strategies", "ma_separation", "--set", "n_experts=6"], "n_experts=6 does not split"),
    (["--strategies", "ma_separation:12"], "expected ma_separation:A+X"),
    (["--strategies", "ma_separation:0+4"], "each sub-mesh needs at least one device"),
    (["--strategies", "tp16", "--devices", "8"], "needs 16 devices, 8 given"),
    (["--strategies", "ep16", "--devices", "100000"], "needs 16 devices, 100000 given"),
    (["--devices", "0"], "--devices 0: must be at least 1"),
    (["--strategies", "ma_separation:8+8", "--devices", "64"], "--devices 64: the strategies"),
    (["--platform", "gpu"], "--platform gpu: JAX finds no gpu device here"),
    (["--platform", "nope"], "argument --platform: invalid choice: 'nope'"),
    (["--seed", "-1"], "--seed -1: must be in 0.."),
    (["--json", "{tmp}/afile/x.json"], "afile is a file, not a directory"),
    (["--json", "{tmp}/adir"], "is a directory; name a file"),
    (["--json", "{tmp}/missing/x.json"], "does not exist; create it first"),
    ([*HUGE], "of memory on this machine"),
    # experiment
    (["experiment", "nope"], "unknown paper 'nope'"),
    (["experiment", "paper000", "--hardware", "nope"], "unknown hardware profile 'nope'"),
    (["experiment", "all", "--hardware", "h100x1"], "the profile has 1 GPU(s)"),
    (["experiment", "paper000", "--iters", "0"], "--iters 0: must be at least 1"),
    (["experiment", "paper000", "--warmup", "-1"], "--warmup -1: must be 0 or more"),
    (["experiment", "paper000", "--json", "{tmp}/adir"], "is a directory; name a file"),
    (["experiment", "all", "--plots", "{tmp}/afile"], "is a file, not a directory"),
    (["experiment", "paper000", "--platform", "gpu"], "--platform gpu: JAX finds no gpu device"),
    # plan
    (["plan", "--config", "nope"], "unknown config 'nope'"),
    (["plan", "--hardware", "nope"], "unknown hardware profile 'nope'"),
    (
        ["plan", "--hardware", "h100x1", "--devices", "16"],
        "the profile has 1 GPU(s), the layouts span 16",
    ),
    (["plan", "--batch", "0"], "--batch 0: must be at least 1"),
    (["plan", "--batch", "99999999999999999999999"], "batch=99999999999999999999999: is too large"),
    (["plan", "--seq", "1"], "--seq 1: must be at least 2"),
    (["plan", "--strategies", ""], "is empty"),
    (["plan", "--strategies", ","], "is empty"),
    (["plan", "--strategies", "ma_separation:16+4"], "exceed the 16 devices"),
    (["plan", "--config", "tiny_moe", "--strategies", "tp16", "--set", "n_heads=12"], "n_heads=12"),
    (
        ["plan", "--config", "tiny_moe", "--strategies", "ep16,heads_dims_4x4", "--batch", "7"],
        "none of the 2 candidates can run tiny_moe",
    ),
    (["plan", "--set", "init_std=-0.5"], "init_std=-0.5: must be > 0"),
    (["plan", "--json", "{tmp}/afile/x.json"], "is a file, not a directory"),
    (["plan", "--platform", "tpu"], "--platform tpu: JAX finds no tpu device here"),
    (["plan", "--devices", "0"], "--devices 0: must be at least 1"),
    (["plan", "--top", "0"], "--top 0: must be at least 1"),
    (["plan", "--phases", "prefill,nope"], "phases prefill, nope: choose among prefill"),
    (["plan", "--strategies", "dp2_xp8"], "'xp8' is not an axis with a size"),
    # explain
    (["explain", "nope"], "unknown strategy 'nope'"),
    (["explain", "tp16", "--set", "n_heads=12"], "splits n_heads=12"),
    (["explain", "ma_separation:16+4"], "exceed the 16 devices"),
    (["explain", "ep16", "--set", "norm_eps=0"], "norm_eps=0.0: must be > 0"),
    (["explain", "ep16", "--json", "{tmp}/adir"], "is a directory; name a file"),
    (["explain", "ep16", "--platform", "gpu"], "--platform gpu: JAX finds no gpu device here"),
    # device
    (["device", "--config", "nope"], "unknown config 'nope'"),
    (["device", *TINY, "--hardware", "nope"], "unknown hardware profile 'nope'"),
    (["device", *TINY, "--iters", "0"], "--iters 0: must be at least 1"),
    (["device", *TINY, "--warmup", "-1"], "--warmup -1: must be 0 or more"),
    (["device", *TINY, "--set", "capacity_factor=nan"], "capacity_factor=nan"),
    (["device", *TINY, "--json", "{tmp}/afile/x.json"], "is a file, not a directory"),
    (["device", *TINY, *HUGE], "of memory on cpu device 0"),
    (["device", *TINY, "--platform", "gpu"], "--platform gpu: JAX finds no gpu device here"),
    # train (on a small model with the GPT-2 vocabulary, in {tmp}/adir/run)
    (["train", "--strategy", "nope"], "unknown strategy 'nope'"),
    (["train", "--steps", "0"], "--steps 0: must be >= 1"),
    (["train", "--steps", "-1"], "--steps -1: must be >= 1"),
    (["train", "--devices", "0"], "--devices 0: must be at least 1"),
    (["train", "--num-processes", "0"], "--num-processes 0: must be at least 1"),
    (["--json", "/proc/x.json"], "cannot be written"),
    (["train", "--save-every", "0"], "--save-every 0: must be >= 1"),
    (["train", "--workdir", "{tmp}/afile"], "is a file, not a directory"),
    (["train", "--workdir", "{tmp}/afile/run"], "cannot be written (Not a directory)"),
    (["train", "--data", "{tmp}/missing.json.gz"], "missing.json.gz"),
    (["train", "--data", "{tmp}/adir"], "adir"),
    (["train", "--tokenizer", "{tmp}/adir"], "tokenizer.json"),
    (["train", "--set", "learning_rate=nan"], "learning_rate=nan: must be a finite number"),
    (["train", "--set", "keep_checkpoints=0"], "keep_checkpoints=0"),
    (["train", "--set", "vocab_size=300"], "set vocab_size=50257"),
    (["train", "--set", "batch=6"], "splits batch=6"),
    (["train", "--num-processes", "3"], "--devices 16 does not split over 3 processes"),
    (["train", "--platform", "gpu"], "--platform gpu: JAX finds no gpu device here"),
    (["train", "--process-id", "5"], "--process-id 5 must be in 0..0"),
    (["train", "--coordinator", "nohostport"], "nohostport"),
    (["train", "--init-timeout", "0"], "--init-timeout 0"),
    (["train", *HUGE], "parameters and optimizer state take"),
    # flags argparse refuses, and a layout with no replica group
    (["train", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["experiment", "all", "--scale", "huge"], "invalid choice: 'huge'"),
    (["--strategies", "ma_separation:12+4/0"], "needs at least one replica group"),
]


def _command(args: list[str]) -> list[str]:
    """compare cases run on the small model (bad-input cases keep their own --set); train cases
    on a small one with the GPT-2 vocabulary, in {tmp}/adir/run unless they say."""
    if args and args[0] in ("experiment", "plan", "explain", "device"):
        return args
    if args and args[0] == "train":
        return ["train", "--no-progress", "--workdir={tmp}/adir/run", *TRAIN_SMALL, *args[1:]]
    return ["compare", *SMALL, *args]


def test_cases_are_distinct():
    keys = [tuple(args) for args, _ in CASES]
    assert len(set(keys)) == len(keys) >= 30


@pytest.mark.parametrize(("args", "needle"), CASES, ids=[" ".join(a) or "-" for a, _ in CASES])
def test_bad_input_is_one_line_before_any_work(args, needle, tmp_path):
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    proc = run(*(a.replace("{tmp}", str(tmp_path)) for a in _command(args)))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # nothing written


def test_non_finite_logits_are_reported_not_hidden(tmp_path):
    """init_std=1e30 passes validation and overflows float32: the one-device pass and both layouts
    give NaN logits. The table says so, the JSON says so, and the command fails."""
    out = tmp_path / "compare.json"
    proc = run(
        *("compare", *SMALL, "--set", "init_std=1e30", "--strategies", "ep16,tp16"),
        *("--json", str(out)),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "NaN or infinite logits" in lines[0] and "one-device" in lines[0]
    assert "ep16, tp16" in lines[0] and "init_std" in lines[0]
    assert "Traceback" not in proc.stderr
    rows = {
        line.split()[0]: line for line in proc.stdout.splitlines() if line[:4] in ("ep16", "tp16")
    }
    assert set(rows) == {"ep16", "tp16"} and all("non-finite" in r for r in rows.values())
    doc = json.loads(out.read_text())  # strict JSON: no NaN
    for entry in doc["strategies"].values():
        assert entry["finite"] is False and entry["max_abs_err"] is None
        assert entry["nonfinite_logits"] > 0 and entry["reference_nonfinite_logits"] > 0


def _report(strategy: str, nonfinite: int, reference: int) -> LayoutReport:
    err = None if nonfinite or reference else 1e-7
    return LayoutReport(
        strategy=strategy,
        mesh={"tensor": 16},
        phase="forward",
        max_abs_err=err,
        logits_scale=None if reference else 1.0,
        inventory=Inventory(()),
        per_layer={},
        minimum_bytes_per_layer=0.0,
        bubble_fraction=0.0,
        param_bytes_per_device=1,
        param_bytes_total=16,
        memory={},
        nonfinite_logits=nonfinite,
        reference_nonfinite_logits=reference,
        n_logits=100,
    )


def test_a_layout_alone_non_finite_is_named_as_a_layout_bug():
    cfg = ModelConfig()
    check_finite(cfg, [_report("tp16", 0, 0), _report("ep16", 0, 0)])  # all finite: no error
    with pytest.raises(ConfigError, match=r"ep16 \(3 of 100\) gave NaN .* a layout bug") as err:
        check_finite(cfg, [_report("tp16", 0, 0), _report("ep16", 3, 0)])
    assert "\n" not in str(err.value) and "tp16" not in str(err.value)
    assert not _report("ep16", 3, 0).finite and _report("tp16", 0, 0).finite


@pytest.mark.parametrize(
    ("assignment", "needle"),
    [
        ("learning_rate=nan", "learning_rate=nan: must be a finite number"),
        ("learning_rate=0", "learning_rate=0.0: must be > 0"),
        ("beta2=1", "beta2=1.0: must be in [0, 1)"),
        ("weight_decay=-inf", "weight_decay=-inf: must be a finite number"),
        ("grad_clip=inf", "grad_clip=inf: must be a finite number"),
        ("final_lr_fraction=nan", "final_lr_fraction=nan"),
        ("final_lr_fraction=2", "final_lr_fraction=2.0: must be in [0, 1]"),
        ("decay_steps=10", "decay_steps=10: must be more than warmup_steps=5000"),
        ("data_seed=-1", "data_seed=-1: must be in 0.."),
        ("rebalance_threshold=inf", "rebalance_threshold=inf"),
    ],
)
def test_training_fields_refuse_non_finite_and_out_of_range(assignment, needle):
    from jaxmoe.config import with_overrides
    from jaxmoe.train.recipe import TrainConfig

    with pytest.raises(ConfigError) as err:
        with_overrides(ModelConfig(), TrainConfig(), assignments=[assignment])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[gpus.x\n", "fix the file"),
        (
            '[gpus.g]\nhbm_bytes = 1\n[profiles.p]\ngpu = "g"\ncount = 16\nper_node = 8\n',
            "hbm_bandwidth=None",
        ),
        (
            "[gpus.g]\nmatmul_flops = { float32 = -1 }\nhbm_bytes = 1\nhbm_bandwidth = 1\n"
            'nvlink_bandwidth = 1\nnetwork_bandwidth = 1\n[profiles.p]\ngpu = "g"\ncount = 16\n'
            "per_node = 8\n",
            "float32=-1",
        ),
        ('[gpus.g]\n[profiles.p]\ngpu = "h"\n', "names gpu 'h'"),
    ],
)
def test_a_broken_hardware_file_is_one_line(tmp_path, text, needle):
    from jaxmoe.analysis import hardware

    path = tmp_path / "hardware.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        hardware.profiles(path)
    assert needle in str(err.value) and "\n" not in str(err.value)
