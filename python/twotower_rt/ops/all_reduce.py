"""All-reduce across the GPUs of one node for tensor parallelism: the custom one-shot / two-shot
kernel over CUDA IPC buffers (``csrc/include/twotower_rt/all_reduce.cuh``), with the choice of
algorithm and the fallback to ``torch.distributed`` beside it, and the reference sum.

Every rank of the process group creates one :class:`CustomAllReduce` (a collective call: it
exchanges IPC handles), then calls :meth:`CustomAllReduce.all_reduce` with tensors of the same
shape in the same order. The custom path needs 2 to 8 ranks on one host whose GPUs can access each
other (or share one GPU: processes on one device can map each other's memory too), bfloat16 or
float32, and a message that fits the IPC buffer in 16-byte units; otherwise the call goes to
``torch.distributed.all_reduce`` (NCCL on GPUs). :func:`choose_algorithm` is that decision as a pure
function, tested on the CPU.

Numerics: the custom kernels add the ranks' values in fp32 in rank order 0..N-1 on every rank, so
all ranks get bitwise the same result, which is exactly :func:`all_reduce_ref` of the inputs.
"""

from __future__ import annotations

import socket
from typing import Literal

import torch
import torch.distributed as dist

from twotower_rt import _ext

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
MAX_RANKS = 8
DEFAULT_BUFFER_BYTES = 8 * 1024 * 1024
# Largest message for one-shot, by world size: it reads N x the message per rank, two-shot about
# 2x, so one-shot wins while latency dominates. Leads from other custom all-reduces (vLLM keeps
# similar limits), to be measured on a multi-GPU machine (bench/run.py all_reduce).
ONE_SHOT_MAX_BYTES = {2: 512 * 1024, 4: 256 * 1024, 6: 128 * 1024, 8: 128 * 1024}

Algorithm = Literal["one_shot", "two_shot", "torch"]
_ALGO_CODES = {"one_shot": 0, "two_shot": 1}
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def all_reduce_ref(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The sum the custom kernels compute: fp32, ranks added in order, cast back to the dtype."""
    acc = inputs[0].float()
    for x in inputs[1:]:
        acc = acc + x.float()
    return acc.to(inputs[0].dtype)


def choose_algorithm(
    nbytes: int,
    world_size: int,
    *,
    dtype: torch.dtype,
    aligned: bool,
    custom_available: bool,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> tuple[Algorithm, str]:
    """``(algorithm, reason)`` for one message of ``nbytes``. ``aligned``: the tensor is contiguous
    and 16-byte aligned; ``custom_available``: this group has working IPC buffers."""
    if not custom_available:
        return "torch", "the custom all-reduce is not set up for this group"
    if dtype not in KERNEL_DTYPES:
        return "torch", f"the kernel takes float32 and bfloat16, not {dtype}"
    if nbytes % 16 or not aligned:
        return "torch", "the message is not contiguous in 16-byte units"
    if nbytes > buffer_bytes:
        return "torch", f"{nbytes} bytes exceed the {buffer_bytes}-byte IPC buffer"
    limit = ONE_SHOT_MAX_BYTES.get(world_size, min(ONE_SHOT_MAX_BYTES.values()))
    if nbytes <= limit:
        return "one_shot", f"<= {limit} bytes at {world_size} ranks"
    return "two_shot", f"> {limit} bytes at {world_size} ranks"


def all_reduce_backend(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, str]:
    """``(backend, reason)`` for the env report: "cuda" where the custom kernel can serve a group
    of GPUs of this host, else "torch" (torch.distributed), or "none" (no such device)."""
    backend, reason = _ext.op_backend(
        device, dtype, ref="torch.distributed.all_reduce", kernel_dtypes=KERNEL_DTYPES
    )
    if backend == "cuda":
        reason += "; needs 2-8 ranks on one host with peer access, else torch.distributed"
    return backend, reason


class CustomAllReduce:
    """One rank's handle on the custom all-reduce of ``group``. Creating it is collective.

    ``buffer_bytes`` bounds the messages the custom kernels take (larger ones go to
    torch.distributed). ``enabled`` and ``reason`` say whether the custom path is set up.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | int | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ):
        if buffer_bytes <= 0 or buffer_bytes % 16:
            raise ValueError(f"buffer_bytes must be a positive multiple of 16, got {buffer_bytes}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.buffer_bytes = buffer_bytes
        if device is None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        if isinstance(device, int):
            device = torch.device("cuda", device)
        self.device = torch.device(device)
        self._own_ptr = 0
        self._peer_ptrs: dict[int, int] = {}
        self._ranks: list[int] = []
        # Every rank takes part in the exchange, even one that cannot use the custom path, so that
        # the group agrees on whether it is enabled.
        local_reason = self._local_reason()
        handle = b""
        if local_reason is None:
            C = _ext.extension_module()
            self._own_ptr, handle = C.all_reduce_allocate(buffer_bytes, self.device.index)
        info = (socket.gethostname(), self.device.index, local_reason, handle)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, info, group=group)
        self.reason = self._group_reason(gathered)
        if self.reason is None:
            try:
                self._open_peers(gathered)
            except RuntimeError as exc:
                self.reason = f"opening the peers' IPC buffers failed: {exc}"
        # Peer access is checked from each side: agree on the outcome, or some ranks would wait
        # in a kernel for ranks that went to torch.distributed.
        outcomes: list = [None] * self.world_size
        dist.all_gather_object(outcomes, self.reason, group=group)
        if self.reason is None:
            self.reason = next(
                (f"rank {r}: {why}" for r, why in enumerate(outcomes) if why is not None), None
            )
        if self.reason is not None:
            self.close()
        self.enabled = self.reason is None

    def _local_reason(self) -> str | None:
        if not 2 <= self.world_size <= MAX_RANKS:
            return (
                f"the custom all-reduce needs 2 to {MAX_RANKS} ranks, the group has "
                f"{self.world_size}"
            )
        if self.device.type != "cuda":
            return f"the device is {self.device}, not a CUDA GPU"
        return _ext.cuda_unsupported_reason(self.device, "all_reduce")

    def _group_reason(self, gathered: list) -> str | None:
        for rank, (_, _, reason, _) in enumerate(gathered):
            if reason is not None:
                return f"rank {rank}: {reason}"
        hosts = {host for host, _, _, _ in gathered}
        if len(hosts) > 1:
            return f"the ranks span several hosts ({', '.join(sorted(hosts))})"
        mine = self.device.index
        for rank, (_, index, _, _) in enumerate(gathered):
            if index != mine and not torch.cuda.can_device_access_peer(mine, index):
                return f"cuda:{mine} cannot access rank {rank}'s cuda:{index} (no peer access)"
        return None

    def _open_peers(self, gathered: list) -> None:
        C = _ext.extension_module()
        for rank, (_, _, _, handle) in enumerate(gathered):
            if rank == self.rank:
                self._ranks.append(self._own_ptr)
                continue
            ptr = C.all_reduce_open_handle(handle, self.device.index)
            self._peer_ptrs[rank] = ptr
            self._ranks.append(ptr)

    def algorithm(self, x: torch.Tensor) -> tuple[Algorithm, str]:
        """What :meth:`all_reduce` would do with ``x``, and why."""
        aligned = x.is_contiguous() and x.data_ptr() % 16 == 0 and x.device == self.device
        return choose_algorithm(
            x.numel() * x.element_size(),
            self.world_size,
            dtype=x.dtype,
            aligned=aligned,
            custom_available=self.enabled,
            buffer_bytes=self.buffer_bytes,
        )

    def all_reduce(
        self, x: torch.Tensor, out: torch.Tensor | None = None, algorithm: Algorithm | None = None
    ) -> torch.Tensor:
        """The sum of ``x`` over the group, into ``out`` (allocated when None; may be ``x``).
        ``algorithm`` forces one (tests, benchmarks); by default :meth:`algorithm` chooses."""
        if out is None:
            out = torch.empty_like(x)
        elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"all_reduce: out must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                f"({tuple(out.shape)}, {out.dtype}, {out.device})"
            )
        chosen, reason = self.algorithm(x)
        if algorithm is not None and algorithm != chosen:
            if algorithm != "torch" and chosen == "torch":
                raise ValueError(f"all_reduce: {algorithm} cannot run: {reason}")
            chosen = algorithm
        if chosen == "torch" or not out.is_contiguous() or out.data_ptr() % 16:
            if out.data_ptr() != x.data_ptr():
                out.copy_(x)
            dist.all_reduce(out, group=self.group)
            return out
        C = _ext.extension_module()
        C.all_reduce(
            ranks=self._ranks,
            input=x.data_ptr(),
            output=out.data_ptr(),
            numel=x.numel(),
            buffer_bytes=self.buffer_bytes,
            rank=self.rank,
            dtype=_DTYPE_CODES[x.dtype],
            algo=_ALGO_CODES[chosen],
            device=self.device.index,
            stream=torch.cuda.current_stream(self.device).cuda_stream,
        )
        return out

    def close(self) -> None:
        """Unmaps the peers' buffers and frees this rank's (after the device is idle)."""
        C = _ext.extension_module()
        if C is None:
            return
        if self._peer_ptrs or self._own_ptr:
            torch.cuda.synchronize(self.device)
        for ptr in self._peer_ptrs.values():
            C.all_reduce_close_handle(ptr, self.device.index)
        self._peer_ptrs.clear()
        if self._own_ptr:
            C.all_reduce_free(self._own_ptr, self.device.index)
            self._own_ptr = 0
        self._ranks = []
        self.enabled = False
        if self.reason is None:
            self.reason = "closed"

    def __enter__(self) -> CustomAllReduce:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
