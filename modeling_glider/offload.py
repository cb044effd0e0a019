"""Lazy experts: an expert library served from off the compute device, through a bounded cache.

With `config.expert_offload` set, a GliderT5 loaded by `from_pretrained` keeps the base T5, the global router and a
cache of `config.expert_cache_size` experts on its devices. The stacked expert tensors of the routed linears
(`lora_A`, `lora_B`, `router_gate`) stay where `ExpertStore` keeps them: in the model's safetensors files
(`"disk"`: each expert's bytes are read from the files, opened at load, when a call first needs that expert), or in
CPU memory (`"cpu"`: read once at load; for accelerators smaller than the library).

Which experts a call may use is known before any token is routed: with `router_candidates = m` the union of its
queries' candidates (each query's m best experts by the global router), otherwise every expert. The call first
leases them from the `ExpertCache`: experts not in it are read into free slots, or into the slots of the least
recently used experts that no running call holds, and every leased slot is pinned until the call ends. A call that
needs more experts than the cache holds is refused; one that needs slots other calls hold waits for them. The lease
is an argument of the call (`expert_lease`) that maps expert ids to cache rows: the routed linears read gates, A and B
from those rows, and route exactly as with the whole library in memory.
"""

import json
import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
OFFLOADED_TENSORS = ("lora_A", "lora_B", "router_gate")
MAX_HEADER_BYTES = 100_000_000  # as the safetensors library


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    offset: int  # where the tensor's data starts in the file, in bytes
    dtype: torch.dtype
    shape: tuple[int, ...]


def safetensors_entries(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file: its dtype, shape and where its data lies, from the header alone (the format:
    an 8-byte little-endian header length, a JSON header of `{name: {dtype, shape, data_offsets}}`, then the data)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path} is not a safetensors file (corrupt or truncated?): bad header length.")
        try:
            header = json.loads(file.read(length))
        except ValueError:
            raise ValueError(
                f"{path} is not a safetensors file (corrupt or truncated?): its header is not JSON."
            ) from None
    entries = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        begin, end = entry.get("data_offsets", (0, -1))
        shape = tuple(entry.get("shape", ()))
        numel = torch.Size(shape).numel()
        if dtype is not None and (end - begin != numel * dtype.itemsize or not 0 <= begin or 8 + length + end > size):
            raise ValueError(f"{path}: tensor {key!r} does not lie within the file (corrupt or truncated?).")
        entries[key] = StoredTensor(path, 8 + length + begin, dtype, shape)
    return entries


def weight_files(locate: Callable[[str], str | None], where: str) -> list[Path]:
    """A saved model's safetensors files: `model.safetensors`, or the shards its index names. `locate(name)` gives the
    local path of the model's file `name` (in its folder, or downloaded from the Hub), None if it has none."""
    single = locate("model.safetensors")
    if single is not None:
        return [Path(single)]
    index = locate("model.safetensors.index.json")
    if index is None:
        raise ValueError(f"{where} holds no model.safetensors (nor an index of shards): nothing to offload from.")
    names = sorted(set(json.loads(Path(index).read_text()).get("weight_map", {}).values()))
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{index} names the shard {name!r}, which is not a file name beside it.")
    files = [locate(name) for name in names]
    if None in files:
        raise ValueError(f"{where}: the shard {names[files.index(None)]} that {index} names is missing.")
    return [Path(file) for file in files]


class ExpertStore:
    """The routed linears' stacked expert tensors, read from safetensors files without loading them whole.

    The files are opened once, at load: a model saved again over the same folder (which replaces the files) does not
    change what this store reads. `in_memory=True` reads every expert tensor into CPU memory at once ("cpu" offload).
    """

    def __init__(self, files: list[Path], shapes: dict[str, tuple[int, ...]], in_memory: bool):
        """`shapes`: every offloaded tensor's name (`<linear path>.lora_A`, ...) and the shape its config implies."""
        entries = {}
        for path in files:
            entries.update(safetensors_entries(path))
        stored = {key for key in entries if key.rsplit(".", 1)[-1] in OFFLOADED_TENSORS}
        problems = [f"the weights have no {key} (experts, target_modules)" for key in sorted(set(shapes) - stored)]
        problems += [
            f"the weights hold {key}, which no expert of config.json adapts" for key in sorted(stored - set(shapes))
        ]
        for key in sorted(stored & set(shapes)):
            entry = entries[key]
            if entry.dtype is None or not entry.dtype.is_floating_point:
                problems.append(f"{key} in {entry.file.name} is not a float tensor")
            elif entry.shape != shapes[key]:
                problems.append(
                    f"{key} in {entry.file.name} holds {entry.shape} but config.json implies {shapes[key]} (experts, "
                    "r, rank_pattern, target_modules, d_model, d_ff)"
                )
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError("The expert library cannot be offloaded: " + "; ".join(problems[:5]) + more + ".")
        self.entries = {key: entries[key] for key in shapes}
        self.descriptors = {path: os.open(path, os.O_RDONLY) for path in files}
        # a file rewritten in place (not replaced by a rename) would serve other bytes than the ones checked here
        self.stamps = {path: self._stamp(descriptor) for path, descriptor in self.descriptors.items()}
        self.tensors = None
        if in_memory:
            pin = torch.cuda.is_available()  # page-locked host memory: faster copies to the accelerator
            self.tensors = {key: self._read(key, 0, shape[0]) for key, shape in shapes.items()}
            if pin:
                self.tensors = {key: tensor.pin_memory() for key, tensor in self.tensors.items()}

    def _read(self, key: str, first: int, count: int) -> torch.Tensor:
        """Rows `first` to `first + count` (along the expert dimension) of the stored tensor `key`, as it is stored."""
        entry = self.entries[key]
        if self._stamp(self.descriptors[entry.file]) != self.stamps[entry.file]:
            raise ValueError(
                f"{entry.file} was rewritten since the model was loaded (its size or modification time changed), so "
                f"{key} may no longer be what was loaded: load the model again."
            )
        row_bytes = torch.Size(entry.shape[1:]).numel() * entry.dtype.itemsize
        data = torch.empty(count * row_bytes, dtype=torch.uint8)
        read = os.preadv(self.descriptors[entry.file], [data.numpy()], entry.offset + first * row_bytes)
        if read != data.numel():
            raise ValueError(f"{entry.file}: {key} ends early (the file is truncated).")
        return data.view(entry.dtype).view(count, *entry.shape[1:])

    def read(self, key: str, slot: int) -> torch.Tensor:
        """Expert slot `slot` of the stored tensor `key` (`<linear path>.lora_A`, ...), in its stored dtype, on CPU."""
        return self.tensors[key][slot] if self.tensors is not None else self._read(key, slot, 1)[0]

    def file_of(self, key: str) -> Path:
        return self.entries[key].file

    @staticmethod
    def _stamp(descriptor: int) -> tuple[int, int]:
        stat = os.fstat(descriptor)
        return stat.st_size, stat.st_mtime_ns

    def close(self) -> None:
        for descriptor in getattr(self, "descriptors", {}).values():  # none if the files were refused
            os.close(descriptor)
        self.descriptors = {}

    def __del__(self):
        self.close()

    def __deepcopy__(self, memo):  # read-only: copies of a model share it
        return self

    def __reduce__(self):
        raise TypeError("A GliderT5 with offloaded experts holds open files and cannot be pickled; load it again.")


class ExpertLease:
    """The experts one call may use, pinned in the cache for as long as the call runs: `slots[e]` is expert e's cache
    row (-1: not leased). Immutable while active, so the call's routing depends on its arguments alone."""

    def __init__(self, cache: "ExpertCache", slots: torch.Tensor):
        self.cache, self.slots, self.active = cache, slots, True
        self.on_device = {slots.device: slots}

    def slots_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.on_device:  # once per device of a call (a model split across devices)
            self.on_device[device] = self.slots.to(device)
        return self.on_device[device]


class ExpertCache:
    """Which expert occupies each of `capacity` cache rows of the routed linears, which rows running calls hold, and
    when each was last used. Thread-safe: calls lease and release under one lock; reads into rows happen under it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.store: ExpertStore | None = None  # attached by `from_pretrained`
        self.expert_in: list[int | None] = [None] * capacity
        self.pins = [0] * capacity
        self.last_used = [0] * capacity
        self.clock = 0
        self.condition = threading.Condition()
        self.local = threading.local()  # how many leases each thread holds (a call inside a call)

    def __deepcopy__(self, memo):  # a copy of the model starts with an empty cache of its own over the same store
        copy = ExpertCache(self.capacity)
        copy.store = self.store
        return copy

    def __reduce__(self):
        raise TypeError("A GliderT5 with offloaded experts holds open files and cannot be pickled; load it again.")

    def resident(self) -> list[int]:
        """The experts in the cache now."""
        with self.condition:
            return sorted(e for e in self.expert_in if e is not None)

    @contextmanager
    def lease(self, linears: list, experts: list[int], num_experts: int, device: torch.device, why: str):
        """Lease `experts` (sorted, distinct ids) for one call, reading the missing ones from the store into the rows
        of the routed `linears`; yields an `ExpertLease`. `why` says where the experts come from, for the error."""
        if self.store is None:
            raise ValueError(
                "This GliderT5 has expert_offload set but no expert store: load it with "
                "GliderT5ForConditionalGeneration.from_pretrained(folder, expert_offload=...)."
            )
        if len(experts) > self.capacity:
            raise ValueError(
                f"This call can use {len(experts)} experts ({why}), but expert_cache_size = {self.capacity}: raise "
                "expert_cache_size, or send fewer tasks per batch."
            )
        wanted = set(experts)
        with self.condition:
            missing = []

            def room_for_the_missing() -> bool:  # other calls may bring in or evict experts while this one waits
                missing[:] = [e for e in experts if e not in self.expert_in]
                return len(self._evictable(wanted)) >= len(missing)

            if getattr(self.local, "leases", 0) and not room_for_the_missing():
                # the rows this call waits for may be those its own thread's outer call holds: it would wait forever
                raise ValueError(
                    f"This call, made inside another call of the model, needs {len(missing)} experts read into the "
                    f"cache ({why}), but expert_cache_size = {self.capacity} and the outer call holds the rows: raise "
                    "expert_cache_size, or make the call after the outer one."
                )
            self.condition.wait_for(room_for_the_missing)
            held = [self.expert_in.index(e) for e in experts if e in self.expert_in]
            victims = self._evictable(wanted)[: len(missing)]
            for row in held:
                self.pins[row] += 1
            try:
                for expert, row in zip(missing, victims):
                    self.expert_in[row] = None  # emptied first: a failed read leaves no half-read expert named here
                    self._read_expert(linears, expert, row)
                    self.expert_in[row] = expert
                    self.pins[row] += 1
                    held.append(row)
            except BaseException:
                for row in held:
                    self.pins[row] -= 1
                raise
            self.clock += 1
            slots = torch.full((num_experts,), -1, dtype=torch.long)
            for row in held:
                self.last_used[row] = self.clock
                slots[self.expert_in[row]] = row
        lease = ExpertLease(self, slots.to(device))
        self.local.leases = getattr(self.local, "leases", 0) + 1
        try:
            yield lease
        finally:
            self.local.leases -= 1
            lease.active = False
            with self.condition:
                for row in held:
                    self.pins[row] -= 1
                self.condition.notify_all()

    def _evictable(self, wanted: set[int]) -> list[int]:
        """Rows no running call holds and no wanted expert occupies: empty rows first, then least recently used."""
        rows = [row for row in range(self.capacity) if not self.pins[row] and self.expert_in[row] not in wanted]
        return sorted(rows, key=lambda row: (self.expert_in[row] is not None, self.last_used[row]))

    def _read_expert(self, linears: list, expert: int, row: int) -> None:
        """Read expert `expert`'s tensors at every routed linear it adapts into cache row `row`."""
        for linear in linears:
            slot = linear.expert_slot_of(expert)
            if slot is not None:
                A, B, gate = checked_expert_tensors(self.store, linear, expert, slot)
                linear.cached_lora_A[row].copy_(A)
                linear.cached_lora_B[row].copy_(B)
                linear.cached_router_gate[row].copy_(gate)


def checked_expert_tensors(store: ExpertStore, linear, expert: int, slot: int) -> list[torch.Tensor]:
    """Expert `expert`'s `lora_A`, `lora_B` and `router_gate` at `linear` (its `slot` there) as the store holds them,
    refused unless finite and zero beyond the expert's rank (what `from_pretrained` checks of a model in memory)."""
    name = linear.config.experts[expert]["name"]
    tensors = []
    for kind in OFFLOADED_TENSORS:
        key = f"{linear.module_path}.{kind}"
        tensor = store.read(key, slot)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"expert {name!r}: {key} in {store.file_of(key)} holds NaN or inf")
        tensors.append(tensor)
    rank = linear.expert_ranks[slot]
    for kind, beyond in (("lora_A", tensors[0][rank:]), ("lora_B", tensors[1][:, rank:])):
        if beyond.any():  # named by its own key and file: a linear's tensors may lie in different shards
            key = f"{linear.module_path}.{kind}"
            raise ValueError(
                f"expert {name!r}: {key} in {store.file_of(key)} holds values beyond rank {rank}, its rank in "
                "config.json (r, rank_pattern)"
            )
    return tensors
