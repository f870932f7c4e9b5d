"""Choice of the training precision (utils/train/precision.py): the default per device, explicit requests, contradictory
flags, and what a resumed run continues in."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import utils.train.precision as precision_module
from utils.common.cli import run_cli
from utils.common.errors import UserError
from utils.train.config import TrainConfig, parse_train_args
from utils.train.precision import requested_precision, resolve_precision, resumed_precision, with_precision

CPU = torch.device("cpu")
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "neu-det-sample.yaml"


@pytest.fixture
def native_bf16(monkeypatch):
    """Set whether the CPU computes bfloat16 natively, whatever this machine's CPU does."""
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: value)
    return set_native


@pytest.mark.parametrize(("argv", "expected"), [
    ([], "auto"), (["--bf16"], "bf16"), (["--fp32"], "fp32"), (["--no-amp"], "fp32"),
    (["--precision", "fp16"], "fp16"), (["--bf16", "--precision", "bf16"], "bf16"), (["--fp32", "--no-amp"], "fp32"),
])
def test_flags_ask_for_one_precision(argv, expected):
    assert requested_precision(parse_train_args(argv)) == expected


@pytest.mark.parametrize("argv", [["--bf16", "--fp32"], ["--bf16", "--no-amp"], ["--precision", "fp16", "--bf16"],
                                  ["--precision", "bf16", "--no-amp"]])
def test_contradictory_flags_are_one_line_errors_before_anything_is_written(argv, tmp_path, capsys):
    import train

    assert run_cli(train.main, [*argv, "--project", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "give only one of them" in err[0], err
    assert "--bf16" in err[0] or "--precision" in err[0]
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_default_is_bfloat16_on_a_native_cpu_and_float32_on_another(native_bf16):
    native_bf16(True)
    chosen = resolve_precision("auto", CPU)
    assert (chosen.name, chosen.autocast, chosen.autocast_dtype, chosen.grad_scaling) == ("bf16", True,
                                                                                         torch.bfloat16, False)
    assert "--fp32 to train in float32" in chosen.describe()
    native_bf16(False)
    chosen = resolve_precision("auto", CPU)
    assert (chosen.name, chosen.autocast) == ("fp32", False)
    assert "neither AVX512-BF16 nor AMX" in chosen.describe() and "--bf16" in chosen.describe()


def test_explicit_bf16_on_an_emulating_cpu_trains_bf16_with_a_warning(native_bf16, caplog):
    native_bf16(False)
    assert resolve_precision("bf16", CPU).name == "bf16"
    assert "emulated and slower" in caplog.text
    assert resolve_precision("fp32", CPU).name == "fp32"


def test_float16_amp_needs_cuda():
    with pytest.raises(UserError, match="float16 AMP needs a CUDA device"):
        resolve_precision("fp16", CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_default_is_float16_amp_with_gradient_scaling():
    chosen = resolve_precision("auto", torch.device("cuda", 0))
    assert (chosen.name, chosen.autocast_dtype, chosen.grad_scaling) == ("fp16", torch.float16, True)


def test_recorded_precision_never_contradicts_the_flags():
    cfg = TrainConfig(bf16=True)
    assert requested_precision(with_precision(cfg, "bf16")) == "bf16"
    changed = with_precision(cfg, "fp32")  # e.g. a resumed bfloat16 run on a CUDA device without bfloat16
    assert (changed.precision, changed.bf16, changed.fp32) == ("fp32", False, False)
    assert requested_precision(changed) == "fp32"


def test_resume_continues_in_the_recorded_precision_on_another_cpu(native_bf16):
    native_bf16(False)  # recorded on a CPU with native bfloat16, resumed on one without: still bfloat16
    assert resumed_precision({"precision": "bf16"}, CPU)[0] == "bf16"
    native_bf16(True)  # and the other way round: a float32 run stays float32
    assert resumed_precision({"precision": "fp32", "fp32": True}, CPU)[0] == "fp32"


def test_resume_says_when_the_precision_changes(native_bf16):
    native_bf16(True)
    name, message = resumed_precision({"precision": "fp16"}, CPU)  # float16 AMP on CUDA, resumed on a CPU
    assert name == "bf16"
    assert "trained in float16 AMP" in message and "continuing in bfloat16 autocast" in message
    assert "changes" in message


def test_runs_saved_before_the_precision_was_recorded_resume_as_they_trained(native_bf16):
    native_bf16(True)
    assert resumed_precision({"bf16": False}, CPU)[0] == "fp32"  # the old default on the CPU
    assert resumed_precision({"bf16": True}, CPU)[0] == "bf16"


def test_resumed_float32_run_stays_float32_where_the_default_differs(tmp_path, native_bf16):
    """End to end through last.pt: a run started with --fp32, extended by --resume, records float32 again even
    where the default would be bfloat16."""
    import yaml

    from utils.runners.train import run_train

    native_bf16(True)
    cfg = TrainConfig(cfg="yolov5n.yaml", data=str(SAMPLE), imgsz=64, batch_size=8, epochs=1, max_batches=1,
                      workers=0, device="cpu", project=str(tmp_path), name="run", noplots=True, noautoanchor=True,
                      fp32=True)
    run_train(cfg)
    last = tmp_path / "run" / "weights" / "last.pt"
    assert torch.load(last, weights_only=True)["precision"] == "fp32"
    run_train(dataclasses.replace(TrainConfig(), resume=str(last), extend=1))
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1 and state["precision"] == "fp32"
    assert yaml.safe_load((tmp_path / "run" / "opt.yaml").read_text())["precision"] == "fp32"
