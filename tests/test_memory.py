"""The memory guard's plan ladder, with the available memory given (no real allocation)."""

from __future__ import annotations

import pytest

from kernel_ext.errors import MemoryBudgetError
from kernel_ext.memory import choose_plan, format_bytes, sample_memory

GB = 1024**3
N = 1_000_000_000  # one billion parameters


def test_fits_as_asked() -> None:
    plan = choose_plan(N, device="cpu", dtype="float32", fraction=0.8, available=16 * GB)
    assert (plan.dtype, plan.quantization, plan.offload) == ("float32", None, False)
    assert plan.estimate_bytes > 4 * N and plan.budget_bytes == int(16 * GB * 0.8)


def test_cpu_degrades_float32_to_bfloat16() -> None:
    plan = choose_plan(N, device="cpu", dtype="float32", fraction=0.8, available=5 * GB)
    assert plan.dtype == "bfloat16" and "float32 does not fit" in plan.reason


@pytest.mark.parametrize(
    "available, expected",
    [
        (40 * GB, ("bfloat16", None, False)),
        (2 * GB, ("bfloat16", "8bit", False)),
        (1 * GB, ("bfloat16", "4bit", False)),
    ],
)
def test_gpu_ladder(available: int, expected: tuple) -> None:
    plan = choose_plan(N, device="cuda", dtype="bfloat16", fraction=0.8, available=available,
                       cpu_available=0)
    assert (plan.dtype, plan.quantization, plan.offload) == expected


def test_gpu_offloads_when_even_4bit_does_not_fit() -> None:
    plan = choose_plan(N, device="cuda", dtype="bfloat16", fraction=0.8, available=GB // 4,
                       cpu_available=8 * GB)
    assert plan.offload and "offloading" in plan.reason


def test_refusal_gives_numbers_and_options() -> None:
    with pytest.raises(MemoryBudgetError) as info:
        choose_plan(N, device="cpu", dtype="float32", fraction=0.5, available=1 * GB)
    msg = str(info.value)
    assert "float32 needs" in msg and "bfloat16 needs" in msg
    assert "512.0 MiB" in msg  # 50 % of 1 GB
    assert "--dtype" in msg and "memory_fraction" in msg and "--device" in msg
    assert isinstance(info.value, RuntimeError)


def test_probe_reports_this_machine() -> None:
    s = sample_memory()
    assert 0 < s.ram_available <= s.ram_total and s.process_rss > 0
    assert s.gpus == [] or all(g.total >= g.used for g in s.gpus)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B" and format_bytes(1536 * 1024) == "1.5 MiB"
    assert format_bytes(None) == "–" and format_bytes(3 * 1024**4) == "3.0 TiB"


def test_float32_plans_count_the_decode_copies() -> None:
    plain = choose_plan(N, device="cpu", dtype="float32", fraction=0.8, available=16 * GB)
    copied = choose_plan(N, device="cpu", dtype="float32", fraction=0.8, available=16 * GB,
                         float32_copies=GB)
    assert copied.estimate_bytes == plain.estimate_bytes + GB
    # a bfloat16 plan makes no fp16 copies: the copies can be what pushes the ladder down
    plan = choose_plan(N, device="cpu", dtype="float32", fraction=0.8, available=6 * GB,
                       float32_copies=2 * GB)
    assert plan.dtype == "bfloat16"


def test_copies_kept_whatever_the_dtype_count_in_every_plan() -> None:
    """decode_mode='quantized' keeps int4 repacks next to float32 and bfloat16 weights alike."""
    plain = choose_plan(N, device="cpu", dtype="bfloat16", fraction=0.8, available=16 * GB)
    copied = choose_plan(N, device="cpu", dtype="bfloat16", fraction=0.8, available=16 * GB,
                         int4_copies=GB, float32_copies=5 * GB)
    assert copied.estimate_bytes == plain.estimate_bytes + GB
