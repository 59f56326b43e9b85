"""Compute dtype and device resolution (`auto`), and where the resolved dtypes are recorded."""
from __future__ import annotations

import json
import warnings

import matplotlib
import pytest
import torch

from replication import devices, experiments, plotting
from replication.lm.activations import ActivationSettings

matplotlib.use("Agg")


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the CPU has (or lacks) native bf16, whatever this machine has."""
    def set_flags(native: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        devices.cpu_bf16_support.cache_clear()
        devices._warn_emulated.cache_clear()
    yield set_flags
    devices.cpu_bf16_support.cache_clear()
    devices._warn_emulated.cache_clear()


def test_auto_on_cpu_follows_native_bf16(cpu_flags) -> None:
    cpu_flags(True)
    assert devices.resolve_dtype("auto", "cpu") == "bfloat16"
    cpu_flags(False)
    assert devices.resolve_dtype("auto", "cpu") == "float32"
    assert devices.resolved_dtypes("auto", "auto", "cpu") == {"model": "float32", "select": "float32"}


def test_environment_caps_count_as_no_native_bf16(cpu_flags, monkeypatch) -> None:
    """ATEN_CPU_CAPABILITY=avx2 / ONEDNN_MAX_CPU_ISA=AVX2 make torch emulate bf16: auto must say float32."""
    cpu_flags(True)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    devices.cpu_bf16_support.cache_clear()
    assert devices.resolve_dtype("auto", "cpu") == "float32"
    assert devices.cpu_bf16_support()["capped_by"] == "ATEN_CPU_CAPABILITY=avx2"
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    devices.cpu_bf16_support.cache_clear()
    assert devices.resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    devices.cpu_bf16_support.cache_clear()
    assert devices.resolve_dtype("auto", "cpu") == "bfloat16"


def test_forced_dtypes_are_kept(cpu_flags) -> None:
    cpu_flags(True)
    assert devices.resolve_dtype("float32", "cpu") == "float32"
    assert devices.resolve_dtype(None, "cpu") == "float32"
    cpu_flags(False)
    with pytest.warns(RuntimeWarning, match="emulates it, ~50x slower"):
        assert devices.resolve_dtype("bfloat16", "cpu", "model_dtype") == "bfloat16"


def test_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model_dtype 'bf16': choose one of 'auto', 'float32', 'bfloat16'"):
        devices.resolve_dtype("bf16", "cpu", "model_dtype")
    with pytest.raises(ValueError, match="unknown select_dtype 'half'"):
        experiments.FamilySpec(select_dtype="half").training_key()


def test_cuda_rules(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert devices.resolve_dtype("auto", "cuda") == "float32"
    with pytest.raises(ValueError, match="'bfloat16' forced on Tesla V100, which cannot run bf16; use 'auto' or 'float32'"):
        devices.resolve_dtype("bfloat16", "cuda", "model_dtype")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert devices.resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert devices.resolve_device("auto") == "cuda"


def test_unknown_or_missing_device_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        devices.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            devices.resolve_device("cuda")
        assert devices.resolve_device("auto") == "cpu"


def test_resolved_dtype_enters_the_cache_keys(cpu_flags) -> None:
    """Caches and families of different dtypes never share a folder; `auto` keys as what it resolves to."""
    cpu_flags(False)
    auto = experiments.FamilySpec(model_dtype="auto", select_dtype="auto")
    fp32 = experiments.FamilySpec(model_dtype="float32", select_dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bf16 = experiments.FamilySpec(model_dtype="bfloat16", select_dtype="bfloat16")
        mixed = experiments.FamilySpec(model_dtype="float32", select_dtype="bfloat16")
        assert len({fp32.training_key(), bf16.training_key(), mixed.training_key()}) == 3
        assert fp32.activation_settings().key() == mixed.activation_settings().key() != bf16.activation_settings().key()
    assert auto.training_key() == fp32.training_key()
    assert auto.activation_settings().model_dtype == "float32"
    assert experiments.family_dir(auto) == experiments.family_dir(fp32)
    cpu_flags(True)
    assert experiments.FamilySpec().training_key() == bf16.training_key()
    with pytest.raises(ValueError, match="resolved model_dtype"):
        ActivationSettings(model_dtype="auto").key()


def test_profiles_ask_for_auto() -> None:
    import yaml

    from replication import paths

    for profile in ("smoke", "default", "paper"):
        family = yaml.safe_load((paths.NOTEBOOKS_DIR / "params" / "family" / f"{profile}.yaml").read_text())
        assert family["model_dtype"] == "auto" and family["select_dtype"] == "auto", profile


def test_figure_json_records_resolved_dtypes(tmp_path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plotting, "figures_dir", lambda profile: tmp_path)
    fig, ax = plt.subplots()
    dtypes = devices.resolved_dtypes("auto", "auto", "cpu")
    plotting.save_figure(fig, "probe", {"a": 1}, {"x": 1.0}, profile="smoke", dtypes=dtypes)
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["params"]["resolved_dtypes"] == dtypes
    assert set(dtypes.values()) <= {"float32", "bfloat16"}
    with pytest.raises(ValueError, match="must be resolved"):
        plotting.save_figure(fig, "probe", {}, {}, dtypes={"model": "auto", "select": "auto"})
    plt.close(fig)
