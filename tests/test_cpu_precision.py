"""The one warning for bf16/fp16 on a CPU that emulates it (vprkit.cpu_precision)."""

import logging

import pytest
import torch

from vprkit import cpu_precision
from vprkit.extract import autocast_context


@pytest.fixture
def fresh_warning():
    cpu_precision._warn_once.cache_clear()
    yield
    cpu_precision._warn_once.cache_clear()


def warnings_in(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "vprkit.cpu_precision"]


def test_fp32_is_native_and_never_warns(caplog, fresh_warning):
    assert cpu_precision.native_on_cpu("fp32") is True
    with caplog.at_level(logging.WARNING):
        cpu_precision.warn_if_emulated("cpu", "fp32")
    assert warnings_in(caplog) == []


def test_this_cpu_warns_for_bf16_exactly_when_it_emulates_it(caplog, fresh_warning):
    layer = torch.nn.Linear(8, 8)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        for _ in range(3):  # one warning, not one per batch
            with autocast_context("cpu", "bf16"):
                assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    expected = 1 if cpu_precision.native_on_cpu("bf16") is False else 0
    assert len(warnings_in(caplog)) == expected


def test_emulating_cpu_gets_one_line_naming_the_precision_and_the_fix(
    caplog, fresh_warning, monkeypatch
):
    # Stand in for a CPU without AVX512-BF16/AMX (e.g. an AVX2-only EPYC) on any machine.
    monkeypatch.setattr(cpu_precision.platform, "machine", lambda: "x86_64")
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert cpu_precision.native_on_cpu("bf16") is False
    with caplog.at_level(logging.WARNING):
        cpu_precision.warn_if_emulated("cpu", "bf16")
        cpu_precision.warn_if_emulated("cpu", "bf16")
        cpu_precision.warn_if_emulated("cuda", "bf16")  # not the CPU's arithmetic
    (message,) = warnings_in(caplog)
    assert "\n" not in message
    assert message.startswith("precision bf16: this CPU has no native bf16 arithmetic")
    assert "AVX512-BF16 or AMX" in message and "fp32" in message


def test_mutual_nn_count_called_directly_warns_on_an_emulating_cpu(
    caplog, fresh_warning, monkeypatch
):
    from vprkit.rerank import mutual_nn_count

    monkeypatch.setattr(cpu_precision.platform, "machine", lambda: "x86_64")
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    query, candidates = torch.randn(16, 8), torch.randn(3, 16, 8)
    with caplog.at_level(logging.WARNING):
        fp32 = mutual_nn_count(query, candidates)
        assert warnings_in(caplog) == []
        low = mutual_nn_count(query, candidates, precision="bf16")
    assert torch.equal(low, fp32)  # counts stay exact; the run goes on
    (message,) = warnings_in(caplog)
    assert message.startswith("precision bf16: this CPU has no native bf16 arithmetic")


def test_other_architectures_are_not_judged(monkeypatch):
    monkeypatch.setattr(cpu_precision.platform, "machine", lambda: "aarch64")
    assert cpu_precision.native_on_cpu("bf16") is None


@pytest.mark.parametrize("flags, native", [({"avx2"}, False), ({"avx2", "avx512_fp16"}, True)])
def test_fp16_is_native_with_avx512_fp16_even_without_amx(monkeypatch, flags, native):
    # Stand in for an AVX2-only CPU and for a Sapphire Rapids (AVX512-FP16, no AMX-FP16).
    monkeypatch.setattr(cpu_precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False, raising=False)
    monkeypatch.setattr(cpu_precision, "_cpuinfo_flags", lambda: frozenset(flags))
    assert cpu_precision.native_on_cpu("fp16") is native
