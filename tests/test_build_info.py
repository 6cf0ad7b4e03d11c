"""CPU: the record of what the extension was built against, the import guard for another torch,
and `python -m flash_attn_t.info`."""
import subprocess
import sys

import pytest
import torch

from flash_attn_t import build_info
from flash_attn_t.info import kernel_family

BUILD = {"version": "0.1.0+cu130torch2.14", "torch": "2.14.1+cu130", "torch_cuda": "13.0", "archs": "8.0;9.0a",
         "sm90_kernels": True, "switches": {}, "environment": {"TORCH_CUDA_ARCH_LIST": None}}


def test_a_patch_release_of_the_same_torch_and_cuda_loads():
    assert build_info.mismatch(BUILD, "2.14.2+cu130", "13.0") is None
    assert build_info.mismatch(BUILD, "2.14.1", "13.1") is None
    assert build_info.mismatch(None, "1.0.0", None) is None  # never built: nothing to check


@pytest.mark.parametrize("version,cuda", [("2.15.0+cu130", "13.0"), ("2.13.0+cu130", "13.0"), ("2.14.1+cu128", "12.8"),
                                          ("2.14.1+cpu", None)])
def test_another_torch_release_or_cuda_major_is_named_with_the_rebuild_command(version, cuda):
    reason = build_info.mismatch(BUILD, version, cuda)
    assert reason is not None
    assert "torch 2.14.1+cu130 (CUDA 13.0)" in reason and f"torch {version} (CUDA {cuda})" in reason
    assert "pip install --no-build-isolation --no-deps -e ." in reason


def test_importing_a_build_for_another_torch_raises_a_clear_import_error():
    # The recorded build faked as one for torch 1.13, in a fresh interpreter.
    code = ("import sys, types\n"
            "fake = types.ModuleType('flash_attn_t._build_config')\n"
            f"fake.BUILD = {dict(BUILD, torch='1.13.1+cu117', torch_cuda='11.7')!r}\n"
            "sys.modules['flash_attn_t._build_config'] = fake\n"
            "import flash_attn_t\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]  # what the user reads last: the guard's, not a loader's
    assert error.startswith("ImportError: flash_attn_t was built against torch 1.13.1+cu117 (CUDA 11.7)")
    assert f"but torch {torch.__version__}" in error
    assert "pip install --no-build-isolation --no-deps -e ." in error


def test_built_with_compares_the_recorded_build_knobs(monkeypatch):
    monkeypatch.setattr(build_info, "BUILD", BUILD)
    assert build_info.built_with({})
    assert not build_info.built_with({"TORCH_CUDA_ARCH_LIST": "9.0a"})
    monkeypatch.setattr(build_info, "BUILD", None)
    assert not build_info.built_with({})


@pytest.mark.parametrize("capability,environ,family", [
    ((9, 0), {}, "sm90 (TMA + wgmma)"),
    ((9, 0), {"FLASH_ATTN_T_FORCE_SM80": "1"}, "sm80 (mma.sync), forced by FLASH_ATTN_T_FORCE_SM80=1"),
    ((8, 0), {}, "sm80 (mma.sync)"),
    ((8, 9), {}, "sm80 (mma.sync)"),
    ((7, 5), {}, "none: the kernels need compute capability 8.0 or newer"),
])
def test_kernel_family_per_gpu(capability, environ, family):
    assert kernel_family(capability, BUILD, environ) == family


def test_kernel_family_without_machine_code_or_without_a_build():
    assert kernel_family((10, 0), BUILD, {}).startswith("none: this build has no machine code for sm_100")
    assert kernel_family((9, 0), dict(BUILD, archs="8.0", sm90_kernels=False), {}) == (
        "none: this build has no machine code for sm_90 (archs 8.0; rebuild with it in TORCH_CUDA_ARCH_LIST)")
    assert kernel_family((9, 0), dict(BUILD, archs="8.0;9.0", sm90_kernels=False), {}) == "sm80 (mma.sync)"
    assert kernel_family((8, 0), None, {}) == "none: flash_attn_t._C is not built"


def test_info_runs_and_says_what_a_bug_report_needs():
    result = subprocess.run([sys.executable, "-m", "flash_attn_t.info"], capture_output=True, text=True, check=True)
    out = result.stdout
    assert out.startswith("flash_attn_t 0.1.0")
    assert f"torch {torch.__version__}" in out
    assert ("build: " + (build_info.BUILD["version"] if build_info.BUILD else "flash_attn_t._C is not built")) in out
    if torch.cuda.is_available():
        assert "GPU 0:" in out and "forward and backward kernels" in out
    else:
        assert "no CUDA GPU visible" in out and "attention_reference" in out
