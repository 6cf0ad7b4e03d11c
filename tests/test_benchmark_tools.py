"""CPU: the pure parts of the benchmark tools (their GPU parts run on the device machine)."""
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.skipif(not BENCHMARKS.is_dir(),
                                reason="benchmarks/ is not beside tests/ (an installed-package test run)")


def load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import each other as run from there
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seqlen,window", [(1, 1), (7, 3), (16, 16), (16, 40), (100, 1)])
def test_window_visited_pairs_counts_the_causal_window(seqlen, window, monkeypatch):
    pairs = sum(1 for i in range(seqlen) for j in range(seqlen) if i - window < j <= i)
    assert load("benchmark_features", monkeypatch).visited_pairs(seqlen, window) == pairs


def test_sass_report_reads_the_wgmma_region_of_each_kernel(monkeypatch):
    line = "        /*{:04x}*/                   {} ;"
    body = ["MOV R1, c[0x0][0x28]", "LDL R2, [R1]", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ",
            "LDL R3, [R1+0x4]", "STL [R1+0x8], R3", "MUFU.EX2 R5, R5", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
            "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "STL [R1+0xc], R4", "EXIT"]
    code = "\n".join(line.format(16 * i, ins) for i, ins in enumerate(body))
    kernel = "\n\t\tFunction : _ZN3fat4sm9010bwd_kernelINS_7VariantINS_7KeyMaskILb{}ELb{}EEELb{}ELb{}ELb0ELb0EEEE\n"
    paged = ("\n\t\tFunction : _ZN3fat4sm9010fwd_kernelINS0_9FwdTraitsI13__nv_bfloat16Li128ELi2ELb0ELb1ELb1ELi1ELb0EEE"
             "NS_7VariantINS_7KeyMaskILb0ELb0EEELb0ELb0ELb0ELb0EEELb1EEEvNS_9FwdParamsE\n")
    sass = ("\n\tcode for sm_90a" + kernel.format(1, 0, 1, 0) + code + kernel.format(0, 1, 0, 1) + code + paged + code +
            "\n\t\tFunction : _ZN3fat9no_mma_kernelE\n" + line.format(0, "EXIT") + "\n")
    rows = list(load("sass_report", monkeypatch).kernel_rows(sass))
    stats = dict(instructions=6, ldl=1, stl=1, full_waits=1, mufu=1)
    assert rows == [("causal+softcap", stats), ("local+alibi", stats), ("plain+paged", stats)]


def test_decode_grid_covers_issue_11s_cases_and_skips_what_does_not_fit(monkeypatch):
    decode = load("benchmark_decode", monkeypatch)
    cases = decode.grid_cases(**{k: decode.GRID[k] for k in ("cases", "queries", "head_configs")})
    assert len(cases) == 3 * 4 * 2 * 2 and len(set(cases)) == len(cases)
    assert (64, 131072, 4, 32, 32) in cases and (1, 4096, 1, 32, 8) in cases
    # K and V, bf16: b8 x 32k x 8 kv heads x 128 is 1 GiB
    assert decode.cache_bytes(8, 32768, 8, 128) == 2**30
    assert decode.fits(2**30, 2 * 2**30) and not decode.fits(2**30, 1.5 * 2**30)
    assert not decode.fits(decode.cache_bytes(64, 131072, 32, 128), 80 * 2**30)  # 128 GiB on an 80 GiB card
