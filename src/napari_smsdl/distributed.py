"""PyTorch distributed (torchrun) support: process group life cycle, rank helpers, collectives, sharding.

``torchrun --nproc_per_node=N -m napari_smsdl ...`` starts N processes and tells each one its place
through environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`init_distributed` reads them and joins the default process group:

* on CUDA, backend ``"cpu:gloo,cuda:nccl"`` — NCCL for CUDA tensors (DistributedDataParallel,
  all-reduce of gradients), gloo for CPU tensors and Python objects — and each process binds to GPU
  ``LOCAL_RANK``;
* on CPU, backend ``"gloo"``.

Without torchrun every helper here degrades to the single-process answer (rank 0 of a world of 1,
collectives are no-ops), so callers never need two code paths for the plain case.

Conventions used by the rest of the package:

* every rank runs the same code on the same inputs; work is split with :func:`shard` (round robin),
  so rank r takes items r, r + N, r + 2N, ...;
* only the main process (rank 0) writes result files and prints (:func:`is_main_process`);
* a process that must wait for another (rank 0 training ViTs, say) waits in a collective, so the
  process-group timeout is long: ``SMSDL_DIST_TIMEOUT_MIN`` minutes (default 120).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

_ENV_KEYS = ("WORLD_SIZE", "RANK")
_owned = False  # True when this module created the default process group
_alone_depth = 0  # > 0 inside alone(): this process acts as a world of one


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job: ``rank`` of ``world_size``, GPU ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when torchrun (or ``python -m torch.distributed.run``) started this process."""
    return all(k in os.environ for k in _ENV_KEYS)


def env_from_environment() -> DistEnv:
    """Rank, world size and local rank from torchrun's environment variables (1 process without them)."""
    if not launched_by_torchrun():
        return DistEnv()
    return DistEnv(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
    )


def is_initialized() -> bool:
    """True when a default process group exists (whoever created it) and this process is not :func:`alone`."""
    if _alone_depth:
        return False
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within this block this process is rank 0 of a world of one: every helper here answers so.

    For work one rank does by itself while the others wait for it in a collective after the block
    (rank 0 extracting in-memory features, say): code inside may call :func:`shard`,
    :func:`barrier` or :func:`all_reduce_sum` without waiting for ranks that never come.
    """
    global _alone_depth
    _alone_depth += 1
    try:
        yield
    finally:
        _alone_depth -= 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    if not is_initialized():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def get_world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    if not is_initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single-process run): the process that writes outputs."""
    return get_rank() == 0


def is_distributed() -> bool:
    """True when a process group with more than one process is active."""
    return get_world_size() > 1


def choose_backend(device: str = "auto") -> str:
    """``"cpu:gloo,cuda:nccl"`` when the job will compute on CUDA, else ``"gloo"``."""
    import torch

    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda and torch.cuda.is_available() and torch.distributed.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _timeout() -> datetime.timedelta:
    minutes = float(os.environ.get("SMSDL_DIST_TIMEOUT_MIN", "120"))
    return datetime.timedelta(minutes=minutes)


def init_distributed(device: str = "auto", backend: str | None = None) -> DistEnv:
    """Join the torchrun job described by the environment; a no-op (rank 0 of 1) without one.

    Parameters
    ----------
    device : str
        The torch device the job computes on (``"auto"``, ``"cpu"``, ``"cuda"``): decides the
        backend and, on CUDA, binds this process to GPU ``LOCAL_RANK``.
    backend : str, optional
        Force a backend (e.g. ``"gloo"``); default from :func:`choose_backend`.

    Returns
    -------
    DistEnv
        This process's rank, world size, local rank and the backend in use.
    """
    global _owned
    env = env_from_environment()
    if not launched_by_torchrun():
        return env
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, str(dist.get_backend()))
    backend = backend or choose_backend(device)
    kwargs = {}
    if "nccl" in backend:
        if env.local_rank >= torch.cuda.device_count():
            from .errors import InputError

            raise InputError(
                f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(env.local_rank)
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    if "SMSDL_NUM_THREADS" not in os.environ:
        # CPU threads per rank: half the cores shared by the ranks of this node (see torch_setup)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        os.environ["SMSDL_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // (2 * max(local_world, 1))))
    dist.init_process_group(backend=backend, timeout=_timeout(), **kwargs)
    _owned = True
    log.debug("joined process group: rank %d/%d, backend %s", env.rank, env.world_size, backend)
    return DistEnv(env.rank, env.world_size, env.local_rank, backend)


def destroy_distributed() -> None:
    """Leave the process group created by :func:`init_distributed` (others' groups are left alone)."""
    global _owned
    if _owned and is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
    _owned = False


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistEnv]:
    """``with distributed_session(device) as env:`` — join on entry (under torchrun), leave on exit.

    Nested use is safe: a session entered while a process group already exists (made by an outer
    session or by the caller) uses it and leaves it alone on exit.
    """
    created = launched_by_torchrun() and not is_initialized()
    env = init_distributed(device)
    try:
        yield env
    finally:
        if created:
            destroy_distributed()


def local_device(device: str = "auto") -> str:
    """The device string for this rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` in a CUDA job."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{env_from_environment().local_rank}" if launched_by_torchrun() else "cuda"
    return device


# ---------------------------------------------------------------------------------------------
# collectives (no-ops in a single process)


def barrier() -> None:
    """Wait until every rank reaches this point."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def _comm_device(tensor_device=None):
    """CPU tensors go through gloo; with NCCL as the only backend they must live on the GPU."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor_device if tensor_device is not None else torch.device("cpu")


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_rank_decides(decide):
    """Call ``decide()`` on rank 0 alone and return what it returns on every rank (picklable).

    An :class:`~napari_smsdl.errors.InputError` it raises (an output folder that holds a run, a
    project another process is writing) is raised on every rank with the same message, so the
    other ranks stop with rank 0 instead of waiting for it until the process-group timeout.
    In one process it is just ``decide()``.
    """
    from .errors import InputError

    if not is_distributed():
        return decide()
    if is_main_process():
        try:
            value = decide()
        except InputError as exc:
            broadcast_object((False, exc.problem, None if exc.path is None else str(exc.path)))
            raise
        broadcast_object((True, value, None))
        return value
    ok, value, where = broadcast_object(None)
    if not ok:
        raise InputError(value, where)
    return value


def gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_array(array: np.ndarray | None, src: int = 0) -> np.ndarray:
    """Rank ``src``'s numpy array on every rank (others may pass None); shape and dtype travel too."""
    if not is_distributed():
        return np.asarray(array)
    import torch
    import torch.distributed as dist

    meta = broadcast_object(None if array is None else (tuple(array.shape), str(np.asarray(array).dtype)), src)
    shape, dtype = meta
    dev = _comm_device()
    if get_rank() == src:
        t = torch.from_numpy(np.ascontiguousarray(array)).to(dev)
    else:
        t = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, device=dev)
    dist.broadcast(t, src=src)
    return t.cpu().numpy()


def all_reduce_sum(array) -> np.ndarray:
    """Element-wise sum of ``array`` over ranks (float64 numpy in, float64 numpy out)."""
    values = np.asarray(array, np.float64)
    if not is_distributed():
        return values
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(values.copy()).to(_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_reduce_mean(array) -> np.ndarray:
    """Element-wise mean of ``array`` over ranks."""
    return all_reduce_sum(array) / get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a cancel request)."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce_sum([1.0 if flag else 0.0])[0] > 0)


def broadcast_module(module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (in place)."""
    if not is_distributed():
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)  # the group's backend for the tensor's device


# ---------------------------------------------------------------------------------------------
# sharding


def shard(items: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of ``items``, round robin: items[rank], items[rank + N], ...

    Round robin (rather than contiguous blocks) balances tiles of a slide whose tissue is uneven.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(items[rank::world_size])


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """Contiguous share ``slice(start, stop)`` of ``range(n)`` for this rank (sizes differ by at most 1)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
