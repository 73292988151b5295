"""The one timing path of the benchmarks: device, AMP, interleaved shuffled rounds, peak memory, records.

Method: every configuration is first called ``warmup`` times; then each of ``rounds`` rounds calls every
configuration once, in an order shuffled by ``random.Random(seed)``, so that machine noise (other work, clock
changes, cache state) hits all configurations alike. A configuration's time is the median over rounds; a time
ratio is the median over rounds of (its time / the reference's time in the same round).

Devices (:class:`BenchDevice`): on CPU a call is timed with ``time.perf_counter``; on CUDA with CUDA events
recorded around the call on the current stream, after a ``torch.cuda.synchronize`` (so that every call starts
on an idle device) and read after the end event has completed (the time the GPU spent from the first to the
last kernel of the call, launch gaps included). ``amp='bf16'`` runs every timed call under
``torch.autocast(device, dtype=torch.bfloat16)``. Peak memory (CUDA): ``torch.cuda.max_memory_allocated``
during one call. Records carry the device, the AMP mode and ``env_*`` (torch / CUDA / cuDNN / torchvision /
timm / spa versions, the GPU's name and capability) from :func:`environment`.

Denormals (CPU): timm's Swin masks the other regions of a shifted window with ``-100``, so ``softmax`` gives
``exp(-100)``-sized probabilities, float32 denormals, and the ``attn @ v`` product over them runs tens of times
slower on x86 (``spa bench block --batch-size 1 --shift``: timm's stage-3 shifted block 8.19 ms forward with
denormals kept, 4.75 ms flushed; README, "Denormals"). SPA blocks mask with ``-inf`` (exact zeros) and never pay this, so a comparison with
denormals on measures timm's mask constant, not the method. The benchmarks therefore flush denormals to zero
(:func:`set_denormals`, ``--denormals flush``, the default) in every timed process, and every record says
whether they were (``env_flush_denormal``, checked in every thread, :func:`denormals_flushed`).
"""

from __future__ import annotations

import contextlib
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from spa.errors import ConfigError, SpaWarning

__all__ = [
    "AMP_MODES",
    "DENORMAL_MODES",
    "DEVICES",
    "BenchDevice",
    "CacheEvictor",
    "cache_evictor",
    "check_timed_denormals",
    "denormals",
    "denormals_flushed",
    "device_sync",
    "environment",
    "interleaved_rounds",
    "median_ratio",
    "pass_fields",
    "peak_memory",
    "restored_denormals",
    "set_denormals",
]

K = TypeVar("K", bound=Hashable)

DEVICES = ("cpu", "cuda")
AMP_MODES = ("off", "bf16")
DENORMAL_MODES = ("flush", "keep")


def _denormal_state() -> str:
    """``flushed``, ``kept`` or ``mixed``: what torch's intra-op CPU threads do with float32 denormal results,
    read off one parallel multiply whose every product is denormal (``1e-30 * 1e-10``), 65536 elements per
    thread so that every thread gets a share."""
    n = max(torch.get_num_threads(), 1) * 65536
    zero = torch.full((n,), 1e-30) * 1e-10 == 0
    return "flushed" if bool(zero.all()) else "kept" if not bool(zero.any()) else "mixed"


def denormals_flushed() -> bool:
    """Whether every CPU thread that torch's intra-op parallel ops use flushes float32 denormals to zero."""
    return _denormal_state() == "flushed"


def set_denormals(mode: str) -> bool:
    """``flush``: float32 denormals are flushed to zero on CPU (``torch.set_flush_denormal(True)``);
    ``keep``: IEEE behaviour (torch's default). Returns :func:`denormals_flushed`.

    The setting belongs to each thread, and torch's CPU worker threads copy the calling thread's when they
    start: call this before the first parallel torch op of the process (the benchmark workers call it first
    thing). Where that was too late, or the CPU cannot flush, a ``SpaWarning`` says so and the records' flag
    says what was measured.
    """
    if mode not in DENORMAL_MODES:
        raise ConfigError(f"denormals must be one of {DENORMAL_MODES}, got {mode!r}")
    supported = torch.set_flush_denormal(mode == "flush")
    state = _denormal_state()
    wanted = "flushed" if mode == "flush" else "kept"
    if state != wanted:
        why = (
            "this CPU cannot flush denormals"
            if mode == "flush" and not supported
            else "torch's CPU threads started before this setting and keep their own"
        )
        warnings.warn(
            f"denormals={mode!r} asked, but denormals are {state} in torch's CPU threads: {why}; the records "
            f"say env_flush_denormal={state == 'flushed'}",
            SpaWarning,
            stacklevel=2,
        )
    return state == "flushed"


def check_timed_denormals(environment: Mapping, mode: str, where: str) -> None:
    """Warn (``SpaWarning``) when a timing process's ``environment`` (:func:`environment`) did not handle
    denormals as ``mode`` asked: the worker's own warning went to its stderr, which is not shown."""
    flushed = environment.get("flush_denormal")
    if flushed is not None and flushed != (mode == "flush"):
        warnings.warn(
            f"{where}: denormals={mode!r} asked, but the timing process measured with denormals "
            f"{'flushed' if flushed else 'not flushed in every thread'}; its records say "
            f"env_flush_denormal={flushed}",
            SpaWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def restored_denormals() -> Iterator[None]:
    """This thread's denormal setting as it was before the ``with`` body, whatever the body sets. Only this
    thread's: torch CPU threads that start inside the body (the pool's first use, or more threads) copy the
    setting they see and keep it."""
    flushed_before = bool(torch.tensor([1e-30]) * 1e-10 == 0)  # one element: computed in this thread
    try:
        yield
    finally:
        torch.set_flush_denormal(flushed_before)


@contextlib.contextmanager
def denormals(mode: str) -> Iterator[bool]:
    """:func:`set_denormals` for the ``with`` body (yields whether every thread flushes), then this thread's
    previous setting back (:func:`restored_denormals`)."""
    with restored_denormals():
        yield set_denormals(mode)


def interleaved_rounds(
    runs: Mapping[K, Callable[[], None]],
    rounds: int,
    warmup: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    timer: Callable[[Callable[[], None]], float] | None = None,
    before_each: Callable[[], None] | None = None,
) -> dict[K, list[float]]:
    """Time every configuration of ``runs`` in interleaved, shuffled rounds.

    Args:
        runs: configuration key -> a call to time (no arguments, result ignored).
        rounds: timed rounds; each calls every configuration once, in a shuffled order.
        warmup: untimed calls of each configuration before the first round.
        seed: seed of the ``random.Random`` that shuffles the order of each round.
        progress: called with ``"warm-up i/n"`` after each configuration's warm-up, ``"round r/R"`` after
            each round.
        sync: called before each clock reading (e.g. to wait for an accelerator's queued work).
        clock: seconds (``time.perf_counter`` unless a test injects another).
        timer: times one call and returns its milliseconds (``BenchDevice.timer``: CUDA events); when given,
            ``sync`` and ``clock`` are not used.
        before_each: called, untimed, before each timed call (e.g. ``cache_evictor``'s eviction pass).

    Returns:
        configuration key -> milliseconds of each round, in round order.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    if timer is None:

        def timer(run: Callable[[], None]) -> float:
            if sync:
                sync()
            start = clock()
            run()
            if sync:
                sync()
            return (clock() - start) * 1e3

    keys = list(runs)
    for i, key in enumerate(keys):
        for _ in range(warmup):
            runs[key]()
        if progress:
            progress(f"warm-up {i + 1}/{len(keys)}")
    times: dict[K, list[float]] = {key: [] for key in keys}
    rng = random.Random(seed)
    for r in range(rounds):
        order = list(keys)
        rng.shuffle(order)
        for key in order:
            if before_each:
                before_each()
            times[key].append(timer(runs[key]))
        if progress:
            progress(f"round {r + 1}/{rounds}")
    return times


class CacheEvictor:
    """Reads and writes a ``megabytes`` buffer on ``device`` (allocated once) per call, so that the next timed
    call starts with caches holding none of its weights or inputs, as a block inside a model does (the blocks
    before it streamed their own).

    On this project's CPU a few small index ops take 10 µs hot and about 50 µs after a 16 MB pass: timed hot,
    a block's fixed per-call work looks several times cheaper than it is in a backbone.
    """

    def __init__(self, megabytes: float, device: str | torch.device = "cpu") -> None:
        if not megabytes > 0:
            raise ConfigError(f"cache eviction size must be > 0 MB, got {megabytes}")
        self.buffer = torch.zeros(max(1, int(megabytes * 2**20) // 4), device=device)

    def __call__(self) -> None:
        self.buffer.add_(1.0)  # a read and a write of every line (a plain fill may bypass the caches)


def cache_evictor(megabytes: float, device: str | torch.device = "cpu") -> CacheEvictor | None:
    """A ``CacheEvictor`` of ``megabytes`` on ``device``; None for 0 (no eviction)."""
    if megabytes == 0:
        return None
    return CacheEvictor(megabytes, device)


def median_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``times[r] / reference[r]`` (both from the same ``interleaved_rounds`` call)."""
    if not times or len(times) != len(reference):
        raise ValueError(f"need two equally long, non-empty lists, got {len(times)} and {len(reference)}")
    return statistics.median(t / d for t, d in zip(times, reference))


def pass_fields(
    times: Mapping[str, Sequence[float]],
    reference: Mapping[str, Sequence[float]],
    passes: Sequence[str] = ("train", "infer"),
    batch_size: int | None = None,
    digits: int = 2,
) -> dict[str, float]:
    """The timing part of a record, for every pass ``p`` of ``passes`` (``times[f"{p}_ms"]``: the per-round
    milliseconds of this configuration, ``reference[f"{p}_ms"]``: its dense baseline's in the same rounds):
    ``{p}_ms`` (median), ``{p}_img_s`` (``batch_size`` / median; with a batch size only) and
    ``{p}_ratio_to_dense`` (``median_ratio``: a TIME ratio, below 1 = faster than dense)."""
    out: dict[str, float] = {}
    for p in passes:
        ms = statistics.median(times[f"{p}_ms"])
        out[f"{p}_ms"] = round(ms, digits)
        if batch_size is not None:
            out[f"{p}_img_s"] = round(batch_size * 1e3 / ms, 3)
    for p in passes:
        out[f"{p}_ratio_to_dense"] = round(median_ratio(times[f"{p}_ms"], reference[f"{p}_ms"]), 4)
    return out


def device_sync(device: str | torch.device = "cpu") -> Callable[[], None] | None:
    """The ``sync`` of :func:`interleaved_rounds` for ``device``: waits for CUDA's queued work; None on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def peak_memory(step: Callable[[], object], device: str | torch.device = "cpu") -> dict[str, float]:
    """One call of ``step``; on CUDA its peak allocated memory (``peak_mem_mb``, MiB) and the part above what
    was allocated before it (``peak_mem_delta_mb``); ``{}`` elsewhere (``step`` still runs once)."""
    device = torch.device(device)
    if device.type != "cuda":
        step()
        return {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mem_mb": round(peak / 2**20, 1), "peak_mem_delta_mb": round((peak - base) / 2**20, 1)}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # a missing or broken package is reported as None
        return None


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name, model number and cache as Linux reports them (e.g. ``Intel(R) Xeon(R) Processor
    (model 167, cache 491520 KB)``: hosts that share a name can differ in speed); else ``platform.processor()``."""
    fields: dict[str, str] = {}
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor's entry
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name and fields.get("CPU part"):  # ARM: no model name, an implementer and a part number
        name = (
            f"{platform.machine()} implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
        )
    name = name or platform.processor() or platform.machine()
    details = [
        f"{label} {fields[key]}"
        for key, label in (("model", "model"), ("cache size", "cache"))
        if fields.get(key)
    ]
    return f"{name} ({', '.join(details)})" if details else name


def environment(device: str | torch.device = "cpu") -> dict:
    """The machine and software a benchmark ran on (``device_name``: the GPU's name on CUDA, else the CPU's
    model, ``cpu_model``; on CUDA also its capability and memory, and the CUDA / cuDNN versions torch was built
    with)."""
    device = torch.device(device)
    processor = cpu_model()
    env = {
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "spa": _version("spa"),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": processor,
        "processor": processor,
        "python": platform.python_version(),
        "flush_denormal": denormals_flushed(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=torch.cuda.get_device_name(device),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        )
    return env


@dataclass(frozen=True)
class BenchDevice:
    """Where and in which precision a benchmark runs; build it with :meth:`resolve` (checks both)."""

    device: torch.device
    amp: str = "off"

    @classmethod
    def resolve(cls, device: str | torch.device = "cpu", amp: str = "off") -> BenchDevice:
        """``device`` in ``DEVICES`` (``cuda``: the current CUDA device), ``amp`` in ``AMP_MODES``; a
        ``ConfigError`` (one line on the command line) for anything else or for CUDA without a GPU."""
        name = str(device)
        kind = name.split(":")[0]
        if kind not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {name!r}")
        if amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(
                    "--device cuda: CUDA is not available on this machine (torch.cuda.is_available())"
                )
            dev = torch.device(name if ":" in name else f"cuda:{torch.cuda.current_device()}")
        else:
            dev = torch.device("cpu")
        return cls(dev, amp)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in bf16 when ``amp == 'bf16'``; a no-op context otherwise."""
        if self.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        """Wait for the device's queued work (CUDA); nothing on CPU."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def timer(self, run: Callable[[], None]) -> float:
        """Milliseconds of one call of ``run``: CUDA events on CUDA (after a sync), ``perf_counter`` on CPU."""
        if not self.is_cuda:
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def rounds(
        self,
        runs: Mapping[K, Callable[[], None]],
        rounds: int,
        warmup: int = 1,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
        before_each: Callable[[], None] | None = None,
    ) -> dict[K, list[float]]:
        """:func:`interleaved_rounds` with this device's timer (and a sync after the warm-up)."""
        times = interleaved_rounds(
            runs, rounds, warmup, seed, progress, timer=self.timer, before_each=before_each
        )
        self.sync()
        return times

    def peak_memory(self, step: Callable[[], object]) -> dict[str, float]:
        """:func:`peak_memory` on this device."""
        return peak_memory(step, self.device)

    def environment(self) -> dict:
        """:func:`environment` of this device."""
        return environment(self.device)

    def fields(self) -> dict[str, str]:
        """What every record says about where it ran: ``device`` (``cpu`` / ``cuda``) and ``amp``."""
        return {"device": self.device.type, "amp": self.amp}
