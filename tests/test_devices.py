"""Tests for clipforge.devices: device names, precision checks against the device, and what the
CPU computes natively, checked against the kernel's own list of CPU flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import clipforge.devices
from clipforge.devices import check_precision, cpu_description, default_device, native_cpu_bf16

CPUINFO = Path("/proc/cpuinfo")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- devices


def test_default_device_picks_cuda_only_where_there_is_one():
    assert default_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert default_device("cpu") == torch.device("cpu")
    assert default_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_on_a_machine_without_it_is_refused(name):
    with pytest.raises(ValueError) as err:
        default_device(name)
    message = one_line(err)
    assert repr(name) in message and "CUDA is not available" in message


@pytest.mark.parametrize("name", ["nonsense", "cuda:x", "", "gpu"])
def test_unknown_device_names_are_refused_naming_them(name):
    with pytest.raises(ValueError) as err:
        default_device(name)
    message = one_line(err)
    assert f"device {name!r} is not a device PyTorch knows" in message
    assert "privateuseone" not in message  # not PyTorch's list of every device type


def test_the_meta_device_is_refused():
    with pytest.raises(ValueError, match="'meta' holds shapes but no values"):
        default_device("meta")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_a_backend_this_machine_lacks_is_refused():
    with pytest.raises(ValueError, match="'mps': mps is not available on this machine"):
        default_device("mps")


# ----------------------------------------------------------------------------- precision


def test_fp16_needs_cuda():
    with pytest.raises(ValueError) as err:
        check_precision("fp16", "cpu", training=True)
    message = one_line(err)
    assert "fp16" in message and "CUDA" in message
    with pytest.raises(ValueError) as err:  # inference runs fp32 or bf16, and says where fp16 belongs
        check_precision("fp16", "cpu")
    message = one_line(err)
    assert "fp16" in message and "CUDA" in message


@pytest.mark.parametrize("precision", ["fp8", "float32", "", "BF16"])
@pytest.mark.parametrize("training", [False, True])
def test_unknown_precisions_are_named(precision, training):
    with pytest.raises(ValueError) as err:
        check_precision(precision, "cpu", training=training)
    message = one_line(err)
    assert repr(precision) in message and "fp32" in message


def test_fp32_is_fine_everywhere():
    assert check_precision("fp32", "cpu") is None
    assert check_precision("fp32", "cpu", training=True) is None


def test_bf16_on_a_cpu_without_native_bf16_warns_and_says_what_to_use(monkeypatch):
    monkeypatch.setattr(clipforge.devices, "native_cpu_bf16", lambda: False)
    note = check_precision("bf16", "cpu")
    assert note is not None and "\n" not in note
    assert "emulated" in note and "use fp32" in note
    assert torch.backends.cpu.get_cpu_capability() in note
    assert check_precision("bf16", "cpu", training=True) == note
    assert cpu_description().endswith("bf16 emulated")


@pytest.mark.parametrize("native", [True, None])
def test_bf16_on_a_cpu_with_native_bf16_or_unknown_is_quiet(monkeypatch, native):
    monkeypatch.setattr(clipforge.devices, "native_cpu_bf16", lambda: native)
    assert check_precision("bf16", "cpu") is None
    assert cpu_description().endswith("bf16 native" if native else "bf16 unknown")


# ----------------------------------------------------------------------------- the CPU


@pytest.mark.skipif(not CPUINFO.is_file(), reason="no /proc/cpuinfo on this system")
def test_native_bf16_agrees_with_the_kernels_cpu_flags():
    native = native_cpu_bf16()
    if native is None:
        pytest.skip("this PyTorch cannot say whether the CPU has native bf16")
    flags: set[str] = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert native == bool(flags & {"avx512_bf16", "amx_bf16"}), sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_cpu_description_names_the_capability_pytorch_dispatches_on():
    description = cpu_description()
    assert description.startswith(torch.backends.cpu.get_cpu_capability() + ", bf16 ")
    assert description.split("bf16 ")[1] in ("native", "emulated", "unknown")
