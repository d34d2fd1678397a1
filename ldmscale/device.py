"""The one place that decides the device: accelerate's process state (cuda:<local rank> under `accelerate launch`,
cuda:0 on one GPU, else the CPU), overridden by `ldmscale --device` or the LDMSCALE_DEVICE environment variable.
Every command moves every model it uses there; nothing falls back to the CPU silently."""

from __future__ import annotations

import os
import platform
import time

import torch

from ldmscale.errors import UserError

ENV = "LDMSCALE_DEVICE"
THREADS_ENV = "LDMSCALE_THREADS"


def _distributed_cpu() -> bool:
    """Without a GPU, accelerate only forms a process group when told it is on the CPU (then gloo)."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def requested() -> str:
    spec = os.environ.get(ENV, "").strip()
    if spec:
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise UserError(f"{ENV}={spec!r} is not a device (cpu, cuda, cuda:1, mps, meta)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{ENV}={spec!r} but torch sees no CUDA device (a CPU build of torch, or no GPU)")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{ENV}={spec!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return spec


def accelerator_kwargs() -> dict:
    """Keyword arguments for accelerate's Accelerator / PartialState that honour the override."""
    spec = requested()
    return {"cpu": True} if spec == "cpu" or (not spec and _distributed_cpu()) else {}


def current() -> torch.device:
    """The device this process computes on."""
    spec = requested()
    if spec and spec != "cpu":
        return torch.device(spec)
    from accelerate import PartialState

    return PartialState(**accelerator_kwargs()).device


def on(module: torch.nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """Put a module on the device (and dtype), in eval mode without gradients: how inference models are held."""
    module = module.to(device or current()) if dtype is None else module.to(device or current(), dtype=dtype)
    return module.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ threads


def _busy_cores(cores: set[int], seconds: float = 0.1) -> float:
    """How many of `cores` other processes keep busy now: /proc/stat sampled twice (Linux); else the load average.
    Torch's threads spin on a core another process wants (2 processes side by side: 63.6 ms an image each with a
    thread per core, 27 ms with one), so they should take only the idle ones."""

    def read() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *vals = line.split()
                    v = [int(x) for x in vals]
                    out[int(name[3:])] = (sum(v), v[3] + (v[4] if len(v) > 4 else 0))  # total, idle + iowait
        return out

    try:
        a = read()
        time.sleep(seconds)
        b = read()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = 0.0
    for c in cores & set(a) & set(b):
        total, idle = b[c][0] - a[c][0], b[c][1] - a[c][1]
        busy += (total - idle) / total if total > 0 else 0.0
    return busy


def _slurm_cpus() -> str | None:
    """In a SLURM job: --cpus-per-task, else the CPUs it holds on this node shared by its tasks here. Without cgroups
    the affinity shows every core; two jobs that each took both cores of the test node trained side by side in 31 s
    what one thread each trained in 2.4 s (tests/test_slurm.py's study, before this rule)."""
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return os.environ["SLURM_CPUS_PER_TASK"]
    cpus = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if not (os.environ.get("SLURM_JOB_ID") and cpus.isdigit()):
        return None
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1").split("(")[0]
    return str(max(1, int(cpus) // max(1, int(tasks) if tasks.isdigit() else 1)))


def thread_count(given: int | None = None) -> tuple[int, str]:
    """(threads, why): --threads, else LDMSCALE_THREADS, else OMP_NUM_THREADS, else a SLURM job's CPUs per task,
    else the cores this process may use (its CPU affinity) that other processes do not keep busy now, shared among
    the local processes of a distributed launch (LOCAL_WORLD_SIZE)."""
    for value, source in (
        (given, "--threads"),
        (os.environ.get(THREADS_ENV), THREADS_ENV),
        (os.environ.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS"),
        (_slurm_cpus(), "the SLURM job's CPUs per task"),  # the allocation, not the node's cores
    ):
        if value is None or str(value).strip() == "":
            continue
        try:
            n = int(value)
        except ValueError:
            raise UserError(f"{source}={value!r} is not a whole number of threads") from None
        if n < 1:
            raise UserError(f"{source}={value}: give at least 1 thread")
        return n, source
    cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    busy = _busy_cores(cores)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    n = max(1, int(len(cores) - busy + 0.5) // local)
    return n, f"{len(cores)} usable cores, {busy:.1f} busy with other work, {local} local process(es)"


def set_threads(given: int | None = None) -> tuple[int, str]:
    """Give torch the threads thread_count() chooses; (threads, why), for the records of latencies."""
    n, why = thread_count(given)
    torch.set_num_threads(n)
    return n, why


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what platform knows."""

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def latency_conditions(device: torch.device | str) -> dict:
    """What a latency was measured under, recorded beside it: the device, CPU, torch threads, usable cores and the
    1-minute load average at the end of the measurement (above the cores: other work shared the machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    device = torch.device(device)
    return {
        "device": str(device),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "cores": cores,
        "gpu_model": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
