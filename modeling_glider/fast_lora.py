"""Routed LoRA at a cost that follows the k selected experts per token, not the library size E.

`GliderLinear.mixture_of_lora` is the formula as written: `sum_e w_e s_e B_e A_e x` over every expert, most with
`w_e = 0`. It stays the readable reference (`lora_implementation="dense"`). The functions here give the same result
(up to rounding) with work proportional to k; every path takes its weights from the one routing function,
`routing.glider_routing_weights`, which exponentiates the k kept logits only.

- `gathered_mixture_of_lora`: gathers each token's k experts' A and B and applies them with batched matmuls: no Python
  loop, k LoRA products per token, the copies at most `GATHER_COPY_BYTES` at a time. On CPU, from 8 rows on, where rows
  share experts (the beams of one query) it reads each expert in use once instead. For few tokens, as in the decoding
  steps, and in compiled graphs.
- `grouped_mixture_of_lora`: sorts the (token, expert) pairs by expert and runs one matmul pair per expert in use, so
  each expert's weights are read once however many tokens chose it. For many tokens (the encoder on long inputs).
  In fp32 on CPU the pairs are two grouped matmuls (`torch._grouped_mm`); otherwise a loop over the experts in use.

"auto" picks per call the formulation `mixture_costs` finds cheapest, from the call's shapes alone.

The mixtures take `scaled_weights` (routing weight times the expert's LoRA scaling, in the input's dtype), or the
routing weights and one `scaling` for every expert (applied once, where the mixture is added to `y`), and
`indices` `[..., k]` into this linear's stacked, zero-padded `lora_A [E, r, d_in]` and `lora_B [E, d_out, r]`.
"""

import functools

import torch

# The cost model of `lora_implementation="auto"`: a formulation costs the bytes it moves through memory plus a fixed
# cost per operator it dispatches, counted in the bytes that move in the same time. The constants are of a kind of
# hardware, not of one processor: an eager CPU operator costs ~5 us, in which one core moves ~50 kB; an accelerator's
# kernel launch ~5 us, in which its memory moves ~10 MB. On CPU a bf16/fp16 matmul goes through oneDNN, ~30 us however
# small (300 kB), and `torch._grouped_mm` pays ~2 us per group (per expert, used or not: 20 kB).
OPERATOR_BYTES = {"cpu": 50_000, "accelerator": 10_000_000}
CPU_HALF_MATMUL_BYTES = 300_000
GROUPED_MM_GROUP_BYTES = 20_000
# The gather path copies every (token, expert) pair's A and B: on a long input, where an accelerator gathers to save
# launches, that would be gigabytes (t5-xl, 4096 tokens, bf16: ~2 GB a call). It takes the tokens in chunks whose
# copies stay below this: a few more operators, bounded memory.
GATHER_COPY_BYTES = 64 * 2**20


def mixture_costs(
    tokens: int,
    k: int,
    num_experts: int,
    rank: int,
    d_in: int,
    d_out: int,
    element_size: int,
    device_type: str,
    grouped_mm: bool,
    used: int | None = None,
) -> dict[str, float]:
    """Each exact formulation's cost, in bytes (see above), for `tokens` tokens routed to `k` of `num_experts` experts
    of rank `rank` (the stacked tensors' padded rank), `used` of them in use (unknown: at most min(E, tokens k)).
    Operators as the functions below dispatch them."""
    operator = OPERATOR_BYTES[device_kind(device_type)]
    half_on_cpu = device_type == "cpu" and element_size == 2
    matmul = CPU_HALF_MATMUL_BYTES if half_on_cpu else operator
    pairs = tokens * k
    used = min(num_experts, pairs) if used is None else used
    expert = rank * (d_in + d_out) * element_size  # one expert's A and B
    rows = 2 * pairs * (d_in + rank + d_out) * element_size  # grouped: each pair's input, hidden and output rows
    # a loop over the experts in use: two matmuls each, and three more operators (six where counts are padded)
    grouped = 5 * operator + used * (2 * matmul + (6 if half_on_cpu else 3) * operator + expert) + rows
    if grouped_mm:  # or two grouped matmuls over every expert's group, whichever costs less (`grouped_mm_pays`)
        grouped = min(
            grouped, 2 * matmul + 8 * operator + 2 * num_experts * GROUPED_MM_GROUP_BYTES + used * expert + rows
        )
    shared = used * tokens * (rank + d_out) * element_size  # read-once: every token through each expert in use
    if device_type == "cpu" and tokens >= 8 and reads_experts_once(used, pairs, k, shared):
        # each expert in use copied once and read, every token through each of them (weight 0 where not chosen)
        gather = 2 * matmul + 7 * operator + 2 * used * expert + 2 * shared
    else:  # each token's k experts copied, then read; in chunks of at most GATHER_COPY_BYTES copied
        chunks = -(-pairs * expert // GATHER_COPY_BYTES)
        gather = max(chunks, 1) * (2 * matmul + 5 * operator) + 2 * pairs * expert
    return {"gather": gather, "grouped": grouped}


def reads_experts_once(used: int, pairs: int, k: int, intermediate_bytes: int) -> bool:
    """Whether the gather path reads each of the `used` experts in use once rather than per (token, expert) pair: the
    product over the experts in use costs used/k times the per-token one, hence the cap on `used`; its intermediates
    (`intermediate_bytes`, every token through every expert in use) stay within `GATHER_COPY_BYTES`."""
    return 2 * used <= pairs and used <= 5 * k and intermediate_bytes <= GATHER_COPY_BYTES


def experts_in_use(indices: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The experts the (token, expert) pairs name and each pair's place among them (`unique`), for calls of 8 rows or
    more on CPU out of compiled graphs; None elsewhere: few rows rarely share experts, and on accelerators and in
    compiled graphs `unique` would wait for the host (its size depends on the data)."""
    if x.shape[:-1].numel() >= 8 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return indices.reshape(-1).unique(return_inverse=True)
    return None


def device_kind(device: torch.device | str) -> str:
    """The kind of hardware `OPERATOR_BYTES` knows a device as: "cpu" or "accelerator"."""
    return "cpu" if torch.device(device).type == "cpu" else "accelerator"


def grouped_mm_pays(used: int, num_experts: int) -> bool:
    """Whether two grouped matmuls over all `num_experts` groups cost less than the loop over the `used` experts in use
    (fp32 on CPU; the terms of `mixture_costs`)."""
    return 2 * num_experts * GROUPED_MM_GROUP_BYTES <= 5 * (used - 1) * OPERATOR_BYTES["cpu"]


@functools.lru_cache(maxsize=4096)  # a pure function of a call's shapes, asked at every routed linear
def cheapest_mixture(*shapes) -> str:
    """The formulation `mixture_costs(*shapes)` finds cheapest."""
    costs = mixture_costs(*shapes)
    return min(costs, key=costs.get)


def gathered_mixture_of_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    scaled_weights: torch.Tensor,
    indices: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
    in_use: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`y` plus, per token, the sum over its k experts of w s B A x, without a loop: gathers and batched matmuls.
    `in_use`: `experts_in_use(indices, x)`, if the caller has it."""
    *lead, d_in = x.shape
    k, r, d_out = indices.shape[-1], lora_A.shape[1], lora_B.shape[1]
    flat = indices.reshape(-1)
    tokens = flat.numel() // k
    lora_A, lora_B, x = lora_A.to(x.dtype), lora_B.to(x.dtype), x.reshape(tokens, d_in)
    # Rows that share experts (the beams of a query, queries of one task) make each expert's weights worth reading once.
    in_use = experts_in_use(flat, x) if in_use is None else in_use
    if in_use is not None:
        experts, slot = in_use
        used = experts.numel()
        if reads_experts_once(used, flat.numel(), k, used * tokens * (r + d_out) * x.element_size()):
            mix = x.new_zeros(tokens, used).scatter_add_(1, slot.view(tokens, k), scaled_weights.view(tokens, k))
            hidden = (x @ lora_A.index_select(0, experts).view(used * r, d_in).T).view(tokens, used, r)
            hidden = (hidden * mix[:, :, None]).transpose(0, 1)  # [used, tokens, r]
            out = torch.bmm(hidden, lora_B.index_select(0, experts).transpose(1, 2)).sum(dim=0)
            return torch.add(y, out.view(*lead, d_out), alpha=scaling)
    pairs, scaled_weights = flat.view(tokens, k), scaled_weights.reshape(tokens, k)
    step = max(1, GATHER_COPY_BYTES // (k * r * (d_in + d_out) * x.element_size()))
    out = [
        gathered_rows(x[s : s + step], scaled_weights[s : s + step], pairs[s : s + step], lora_A, lora_B)
        for s in range(0, max(tokens, 1), step)
    ]
    return torch.add(y, (torch.cat(out) if len(out) > 1 else out[0]).view(*lead, d_out), alpha=scaling)


def gathered_rows(
    x: torch.Tensor, scaled_weights: torch.Tensor, indices: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> torch.Tensor:
    """sum_j w_j B_j A_j x per row of `x` `[tokens, d_in]`, its experts `indices` `[tokens, k]` copied out of the
    stacks: `[tokens, d_out]`."""
    (tokens, k), r, d_in, d_out = indices.shape, lora_A.shape[1], lora_A.shape[2], lora_B.shape[1]
    flat = indices.reshape(-1)
    A = lora_A.index_select(0, flat).view(tokens, k * r, d_in)
    # [tokens, 1, d_in] @ [tokens, d_in, k r]: with the vector on the left the batched matmul stays on its fast path
    hidden = torch.bmm(x[:, None, :], A.transpose(1, 2)).view(tokens * k, 1, r)
    hidden = hidden * scaled_weights.reshape(tokens * k, 1, 1)
    B = lora_B.index_select(0, flat)
    return torch.bmm(hidden, B.transpose(1, 2)).view(tokens, k, d_out).sum(dim=1)


def grouped_mm_applies(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, aligned: bool = True) -> bool:
    """Whether `torch._grouped_mm` computes the grouped path: in fp32 on CPU, out of autograd (its CPU backward refuses
    some gradient layouts) and out of compiled graphs (which accept bf16 only). In bf16/fp16 on CPU it runs one oneDNN
    matmul per group, and oneDNN keeps a kernel per shape (the process grows with every new group size, measured):
    the loop below bounds the shapes instead. Other devices: untested, so the loop. `aligned=False` skips the check of
    the tensors' addresses (16-byte aligned: always so for parameters)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)
    return (
        hasattr(torch, "_grouped_mm")
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and all(size % 4 == 0 for size in (x.shape[-1], *lora_B.shape[1:]))  # it wants 16-byte strides
        and (not aligned or all(tensor.data_ptr() % 16 == 0 for tensor in (lora_A, lora_B)))
        and not needs_grad
        and not torch.compiler.is_compiling()
    )


def grouped_mixture_of_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    scaled_weights: torch.Tensor,
    indices: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
) -> torch.Tensor:
    """`y` plus, per token, the sum over its k experts of w s B A x: one matmul pair per expert in use, on the tokens
    that chose it, added into `y` in place (no `[tokens k, d_out]` intermediate in the loop)."""
    d_in, k = x.shape[-1], indices.shape[-1]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)  # (token, expert) pairs grouped by expert
    tokens = order // k
    weights = scaled_weights.reshape(-1).index_select(0, order)[:, None]
    x, out = x.reshape(-1, d_in), y.view(-1, y.shape[-1])
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    counts = torch.bincount(flat, minlength=lora_A.shape[0])
    # Every expert's matmul pair in one grouped matmul each (groups: the experts' runs of pairs, empty ones included):
    # a dozen operators whatever the number of experts in use, but a cost per group; on CPU, where counting the
    # experts in use waits for nothing, the loop below serves calls that use few of many experts.
    if grouped_mm_applies(x, lora_A, lora_B) and grouped_mm_pays(int(counts.count_nonzero()), lora_A.shape[0]):
        ends = counts.cumsum(0).to(torch.int32)
        hidden = torch._grouped_mm(x.index_select(0, tokens), lora_A.transpose(1, 2), offs=ends) * weights
        out.index_add_(0, tokens, torch._grouped_mm(hidden, lora_B.transpose(1, 2), offs=ends), alpha=scaling)
        return y
    # On CPU, oneDNN keeps a kernel resident for every bf16/fp16 matmul shape it meets (about 0.5 MB each, measured):
    # one shape per token count would grow the process by hundreds of MB over a server's life. Counts are rounded up
    # to a power of two there, the extra rows weighing 0 (at most twice the LoRA work, a handful of shapes).
    bucket = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
    end = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            rows, rows_weights = tokens[end : end + count], weights[end : end + count]
            if bucket and count & (count - 1):
                pad = (1 << count.bit_length()) - count
                rows = torch.cat([rows, rows[:1].expand(pad)])
                rows_weights = torch.cat([rows_weights, rows_weights.new_zeros(pad, 1)])
            hidden = (x.index_select(0, rows) @ lora_A[expert].T) * rows_weights
            out.index_add_(0, rows, hidden @ lora_B[expert].T, alpha=scaling)
            end += count
    return y
