"""GPU paths proven without a GPU (issue 13, defects 1 and 5-8): our planning logic over a fake
device inventory (tests/gpu_inventory.py), real tiny models on the CPU where the code is device
generic. The tests marked ``cuda`` run the same paths on a real GPU (``make gpu-check``)."""

from __future__ import annotations

import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from gpu_inventory import GiB, a100_and_t4, install

from kernel_ext.errors import AllProvidersFailedError, ProviderOutOfMemoryError
from kernel_ext.memory import available_bytes, choose_plan, sample_memory
from kernel_ext.models import resolve_dtype
from kernel_ext.providers.base import GenerationParams, GenerationResult, Health
from kernel_ext.residency import tensor_bytes as _footprint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- 1. dtype by the target device's compute capability -----------------------------------------
def test_auto_dtype_follows_the_target_gpus_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, a100_and_t4())
    # torch.cuda.is_bf16_supported() says True for both (it counts emulation)
    assert resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert resolve_dtype("auto", "cuda:1") == "float16"  # T4: sm_75, bf16 only emulated
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cuda:1") == "bfloat16"  # asked for explicitly


def test_ladder_rungs_use_the_devices_16_bit_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, a100_and_t4())
    n = 1_000_000_000
    rungs = {}
    for avail in (3 * GiB, 1 * GiB + GiB // 2, GiB):
        plan = choose_plan(n, device="cuda:1", dtype="float32", fraction=0.9, available=avail,
                           cpu_available=64 * GiB)
        rungs[plan.quantization] = plan.dtype
        assert "bfloat16" not in plan.reason
    assert rungs == {None: "float16", "8bit": "float16", "4bit": "float16"}
    offload = choose_plan(n, device="cuda:1", dtype="float32", fraction=0.9,
                          available=GiB // 4, cpu_available=64 * GiB)
    assert offload.offload and offload.dtype == "float16"
    on_a100 = choose_plan(n, device="cuda:0", dtype="float32", fraction=0.9, available=3 * GiB)
    assert on_a100.dtype == "bfloat16"


# --- 5. GPU memory via NVML, by UUID, no context on GPUs we do not use --------------------------
def test_gpu_memory_comes_from_nvml_by_uuid_without_cuda_contexts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inv = install(monkeypatch, a100_and_t4())
    gpus = sample_memory().gpus
    # torch's numbering (CUDA_VISIBLE_DEVICES applied), NVML's numbers matched by UUID; the
    # GPU hidden from this process is not shown
    assert [(g.index, g.name, g.total, g.used) for g in gpus] == [
        (0, "NVIDIA A100-SXM4-40GB", 40 * GiB, 3 * GiB),
        (1, "Tesla T4", 15 * GiB, 5 * GiB),
    ]
    assert available_bytes("cuda:1") == 10 * GiB
    assert inv.mem_get_info_calls == [] and inv.contexts == set()


def test_without_nvml_only_gpus_in_use_are_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    inv = install(monkeypatch, a100_and_t4(), nvml=False)
    inv.contexts.add(1)  # this kernel runs a model on GPU 1
    for _ in range(3):  # the dashboard samples once a second
        gpus = sample_memory().gpus
    assert [g.index for g in gpus] == [1] and gpus[0].free == 10 * GiB
    assert set(inv.mem_get_info_calls) == {1} and inv.contexts == {1}


def test_dashboard_sampling_creates_no_cuda_context(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kernel_ext.config import KernelExtConfig
    from kernel_ext.session import Session
    from widgets.dashboard import Dashboard

    inv = install(monkeypatch, a100_and_t4(), nvml=False)  # and this kernel uses no GPU
    session = Session(KernelExtConfig(), None, state_dir=tmp_path)
    d = Dashboard(session, interval=0)  # its own sampler: kernel_ext.memory.sample_memory
    try:
        d.start()
        for _ in range(5):
            d.tick()
        assert d.ticks >= 5 and set(d.memory.readings) == {"cpu"}
    finally:
        d.close()
        session.close()
    assert inv.mem_get_info_calls == [] and inv.contexts == set()
    with_nvml = install(monkeypatch, a100_and_t4())
    assert [g.index for g in sample_memory().gpus] == [0, 1]  # NVML shows both, no context
    assert with_nvml.contexts == set()


def test_the_guard_probes_only_the_device_it_loads_on(monkeypatch: pytest.MonkeyPatch) -> None:
    inv = install(monkeypatch, a100_and_t4(), nvml=False)
    assert available_bytes("cuda:1") == 10 * GiB
    assert inv.mem_get_info_calls == [1] and inv.contexts == {1}


def test_real_nvml_without_a_driver_falls_back_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pytest.skip("this machine has an NVIDIA driver")
    except pynvml.NVMLError:
        pass
    from kernel_ext import memory

    monkeypatch.setattr(memory, "_NVML", memory._Nvml())
    assert memory._NVML.memory("GPU-00000000-0000-0000-0000-000000000000") is None
    s = sample_memory()
    assert s.ram_total > 0 and s.gpus == []


# --- 6. after an OOM: references dropped, cache emptied, prefill shrunk -------------------------
class _OomOnce:
    """A provider whose first generate() runs out of memory inside a forward pass holding a
    KV-cache tensor, the way the real one does (a CUDA OOM cannot be caused on the CPU)."""

    name = "gpu"

    def __init__(self) -> None:
        self.calls: list[GenerationParams] = []
        self.kv_alive_on_retry: bool | None = None
        self._kv: weakref.ref[Any] | None = None

    def cache_identity(self) -> str:
        return "oom-once"

    def load(self) -> None:
        pass

    def health(self) -> Health:
        return Health(True, "ok")

    def close(self) -> None:
        pass

    def _forward(self) -> None:
        kv_cache = torch.zeros(1 << 20)  # what the frames of a real OOM keep alive
        self._kv = weakref.ref(kv_cache)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def generate(self, prompt: str, params: GenerationParams, *, on_token: Any = None,
                 should_stop: Any = None) -> GenerationResult:
        self.calls.append(params)
        if len(self.calls) == 1:
            try:
                self._forward()
            except torch.OutOfMemoryError as e:
                err = ProviderOutOfMemoryError(f"gpu: out of memory ({e})")
                err.prompt_tokens = 1000
                raise err from e
        assert self._kv is not None
        self.kv_alive_on_retry = self._kv() is not None
        return GenerationResult(text="ok", prompt=prompt, model="gpu", provider="gpu",
                                completion_tokens=1)


def test_oom_retry_drops_the_kv_cache_and_shrinks_the_prefill(tmp_path: Path) -> None:
    from kernel_ext.config import KernelExtConfig
    from kernel_ext.resilience import attach
    from kernel_ext.session import Session

    session = Session(KernelExtConfig(retry_attempts=1), None, state_dir=tmp_path / "state")
    attach(session, sleep=lambda s: None)
    provider = _OomOnce()
    session.resilience.add_provider("gpu", provider)  # type: ignore[attr-defined]
    r = session.infer("Q", GenerationParams(max_new_tokens=64), model="gpu")
    assert r.text == "ok"
    assert provider.kv_alive_on_retry is False  # the OOM's frames no longer hold it
    first, retry = provider.calls
    assert first.prefill_chunk is None and retry.prefill_chunk == 500
    assert retry.max_new_tokens == 32
    assert any("chunks of 500 tokens" in n and "max_new_tokens=32" in n for n in r.notes)


def test_release_clears_a_whole_failure_chain_and_a_stale_last_exc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kernel_ext import oom

    refs = []

    def forward() -> None:
        activations = torch.ones(1 << 16)
        refs.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory")

    def failure() -> BaseException:
        try:
            try:
                forward()
            except torch.OutOfMemoryError as e:
                raise ProviderOutOfMemoryError("oom") from e
        except ProviderOutOfMemoryError as e:
            return AllProvidersFailedError("all failed", {"gpu": e})
        raise AssertionError

    stale, current = failure(), failure()
    monkeypatch.setattr(sys, "last_exc", stale, raising=False)  # a previous cell's failure
    assert all(r() is not None for r in refs)
    assert oom.is_oom(current) and not oom.is_oom(ValueError("x"))
    oom.release(current)
    assert all(r() is None for r in refs)
    assert "oom" in str(current.causes["gpu"])  # the exceptions themselves stay usable


def test_retry_params_shrink_until_nothing_is_left() -> None:
    from kernel_ext import oom

    p = GenerationParams(max_new_tokens=2, prefill_chunk=40)
    p, what = oom.retry_params(p) or (p, "")
    assert (p.prefill_chunk, p.max_new_tokens) == (20, 1) and "chunks of 20" in what
    assert oom.retry_params(p) is None  # a 10-token chunk would save nothing; 1 token left
    assert oom.retry_params(GenerationParams(max_new_tokens=1)) is None
    # the offline cache's key: the chunk does not change the answer
    assert "prefill_chunk" not in GenerationParams(prefill_chunk=64).cache_key()


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tinymodels import write_tiny_gemma3

    from kernel_ext.gguf.loader import load_transformers

    path = write_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "g.gguf", sliding_window=8,
                             layers=2)
    return load_transformers(path, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_gives_the_same_tokens(tiny_gemma: Any, chunk: int) -> None:
    from kernel_ext.providers.decode import decode

    ids = torch.tensor([[2] + list(range(300, 330))])  # 31 tokens, past the sliding window
    whole = decode(tiny_gemma.model, ids, max_new_tokens=8)
    chunked = decode(tiny_gemma.model, ids, max_new_tokens=8, prefill_chunk=chunk)
    assert chunked.tokens == whole.tokens and chunked.prompt_tokens == 31


# --- 7. checkpoints: device tensors hashed once per change, restored where possible --------------
def test_tensor_from_a_missing_gpu_is_restored_on_the_cpu_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kernel_ext.checkpoint._codec import decode, encode

    saved = encode(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    meta = {**saved.meta, "device": "cuda:3"}  # saved on a machine with four GPUs
    install(monkeypatch, a100_and_t4())  # this one has two
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = decode("torch", meta, [p.array for p in saved.parts])
    assert t.device.type == "cpu" and t.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert any("cuda:3" in str(w.message) and "CPU" in str(w.message) for w in caught)


def test_device_hash_cache_follows_identity_version_and_layout() -> None:
    from kernel_ext.checkpoint._codec import _array_part, _DeviceHashes, _host_array

    cache = _DeviceHashes()
    t = torch.arange(12, dtype=torch.float32)
    assert cache.get(t) is None
    part = _array_part(_host_array(t))
    cache.put(t, part)
    hit = cache.get(t)
    assert hit is not None and hit.hash == part.hash and hit._array is None  # no host copy
    assert hit.ref() == part.ref() and hit.nbytes == part.nbytes
    t.add_(1)  # an in-place write bumps the version counter
    assert cache.get(t) is None
    cache.put(t, _array_part(_host_array(t)))
    t2 = t.view(3, 4)
    assert cache.get(t2) is None  # another tensor object (and shape)
    t2[0, 0] = 7  # a write through a view bumps the shared version
    assert cache.get(t) is None
    cache.put(t, _array_part(_host_array(t)))
    del t, t2, hit  # (a lazy part holds its tensor until the store has read it)
    assert cache._entries == {}  # entries die with their tensor


def test_a_lazy_device_part_is_copied_only_when_the_store_lacks_it(tmp_path: Path) -> None:
    from kernel_ext.checkpoint._codec import Encoded, _array_part, _DeviceHashes, _host_array
    from kernel_ext.checkpoint.store import Store

    store = Store(tmp_path / "ckpt")
    t = torch.arange(1000, dtype=torch.float32)
    cache = _DeviceHashes()
    cache.put(t, _array_part(_host_array(t)))
    lazy = cache.get(t)
    assert lazy is not None
    store._write_parts([lazy], None)  # a new store: it must read the bytes
    assert lazy._array is not None
    again = cache.get(t)
    assert again is not None
    store._write_parts([again], None)  # already stored: no host copy
    assert again._array is None
    enc = Encoded("torch", {}, [again])
    assert enc.digest


@needs_cuda
@pytest.mark.cuda
def test_cuda_tensor_is_hashed_once_per_change_and_round_trips(tmp_path: Path) -> None:
    from kernel_ext.checkpoint._codec import decode, encode

    t = torch.randn(256, 256, device="cuda").to(torch.bfloat16)
    first = encode(t)
    second = encode(t)
    assert second.parts[0].hash == first.parts[0].hash
    assert getattr(second.parts[0], "_array", "copied") is None  # no host copy this time
    t.mul_(2)
    third = encode(t)
    assert third.parts[0].hash != first.parts[0].hash
    back = decode("torch", third.meta, [third.parts[0].array])
    assert back.device == t.device and torch.equal(back, t)


# --- 8. footprint of an offloaded model; fork_rng covers what manual_seed reseeds ---------------
def test_footprint_does_not_count_offloaded_meta_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100))
    model[1].to("meta")  # what accelerate leaves in place of a layer offloaded to disk
    # (the registry counts footprints with kernel_ext.residency.tensor_bytes)
    assert _footprint(model) == (100 * 100 + 100) * 4


def test_seeded_generation_forks_every_cuda_device_it_reseeds(
    monkeypatch: pytest.MonkeyPatch, tiny_gemma: Any
) -> None:
    from kernel_ext.providers.transformers_gguf import LocalModel, TransformersGGUFProvider

    install(monkeypatch, a100_and_t4())
    forked: list[list[int]] = []
    real_fork = torch.random.fork_rng
    real_seed = torch.manual_seed

    def recording_fork(devices: Any = None, **kwargs: Any) -> Any:
        forked.append(list(devices or []))
        return real_fork(devices=[], **kwargs)  # no real GPU to fork here

    def cpu_seed(seed: int) -> Any:
        return torch.random.default_generator.manual_seed(seed)  # reseeding all is the point

    monkeypatch.setattr(torch.random, "fork_rng", recording_fork)
    monkeypatch.setattr(torch, "manual_seed", cpu_seed)
    art = tiny_gemma
    local = LocalModel(model=art.model, tokenizer=art.tokenizer, path=Path("g.gguf"),
                       sha256="0" * 64, device="cpu", dtype="float32")
    p = TransformersGGUFProvider("tiny", local)
    p.generate("hello", GenerationParams(max_new_tokens=2, temperature=1.0, seed=3))
    assert real_seed is not cpu_seed and forked == [[0, 1]]  # manual_seed reseeds GPUs 0 and 1


@needs_cuda
@pytest.mark.cuda
def test_cuda_probe_reports_this_gpu_and_dtype() -> None:
    from kernel_ext.memory import cuda_devices, half_dtype

    devs = cuda_devices()
    assert devs and devs[0].uuid.startswith(("GPU-", "MIG-"))
    cap = torch.cuda.get_device_capability(0)
    assert half_dtype("cuda:0") == ("bfloat16" if cap >= (8, 0) else "float16")
    g = sample_memory().gpus
    assert g and g[0].total == pytest.approx(devs[0].total, rel=0.05)
