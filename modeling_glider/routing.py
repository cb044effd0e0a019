"""GLIDER's routers and the mixture-of-LoRA linear they drive.

Per routed linear and per token x (that linear's input), with u the query's instruction embedding:

    logits_e = local_e(x) + alpha * cos(u, G_e)          (the global term is absent without u: Phatgoose)
    w = renormalise(top_k(softmax(logits)))               (fp32)
    y = W x + sum_e w_e s_e B_e A_e x

`local_e` is Phatgoose's `LN(x) . LN(v_e) / sqrt(d_in)` or Arrow's `|x . v_e| / T`. Everything a call routes by
arrives as arguments, so one batch may mix tasks and threads may share a model. With `config.router_candidates = m`,
the experts of a query are first narrowed to its m best by the global logits (`candidate_experts`), and only their
local logits are computed.
"""

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from .fast_lora import (
    OPERATOR_BYTES,
    cheapest_mixture,
    device_kind,
    experts_in_use,
    gathered_mixture_of_lora,
    grouped_mixture_of_lora,
    grouped_mm_applies,
)

ROUTER_LAYER_NORM_EPS = 1e-5
REFERENCE_RENORMALISATION_EPS = 1e-6  # the authors' code renormalises top-k weights as w / (sum(w) + 1e-6)


def phatgoose_gates(gates: torch.Tensor) -> torch.Tensor:
    """LN(v_e) / sqrt(d_in) in fp32, LN without affine parameters: the input-independent half of `phatgoose_logits`."""
    return F.layer_norm(gates.float(), gates.shape[-1:], eps=ROUTER_LAYER_NORM_EPS) / math.sqrt(gates.shape[-1])


def phatgoose_inputs(x: torch.Tensor) -> torch.Tensor:
    """LN(x) in fp32, LN without affine parameters: the gate-independent half of `phatgoose_logits`."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=ROUTER_LAYER_NORM_EPS)


def phatgoose_logits(x: torch.Tensor, normalised_gates: torch.Tensor) -> torch.Tensor:
    """local_e = LN(x) . LN(v_e) / sqrt(d_in) in fp32, the gates given as `phatgoose_gates(v)`. [..., d] -> [..., E];
    `[N, d]` against the gates of L linears `[L, E, d]` -> `[L, N, E]`."""
    return phatgoose_inputs(x) @ normalised_gates.mT


def arrow_logits(x: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """local_e = |x . v_e| / T, v_e the top right singular vector of B_e A_e. [..., d], [E, d] -> [..., E] (or
    `[L, N, E]` as `phatgoose_logits`)."""
    return (x.float() @ prototypes.float().mT).abs() / temperature


def glider_routing_weights(
    local_logits: torch.Tensor,
    global_logits: torch.Tensor | None,
    top_k: int,
    top_p: float | None = None,
    reference: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(local + global) over the experts in fp32, keep the top-k (and the top-p mass), renormalise.

    The one routing function of every path. The renormalised top-k of a softmax is the softmax of the top-k logits,
    so only the k kept experts are exponentiated; top-p still sees the whole distribution through one logsumexp.
    Returns the kept weights and expert indices, best first, each `[..., min(top_k, E)]`. Experts cut by top-p keep
    their slot with weight 0.

    `reference=True` follows the GLIDER authors' code: with `top_p` below 1, the smallest set of experts whose mass
    reaches it over ALL experts (top-k ignored; every expert gets a slot, `[..., E]`); otherwise the top-k
    probabilities divided by their sum plus 1e-6.
    """
    logits = local_logits.float() if global_logits is None else local_logits.float() + global_logits.float()
    if reference:
        if top_p is not None and top_p < 1:
            probs, indices = logits.softmax(dim=-1).sort(dim=-1, descending=True)
            kept = probs * ((probs.cumsum(dim=-1) - probs) < top_p)  # the best expert is always kept
            return kept / kept.sum(dim=-1, keepdim=True), indices
        probs, indices = logits.softmax(dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        return probs / (probs.sum(dim=-1, keepdim=True) + REFERENCE_RENORMALISATION_EPS), indices
    top_logits, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    if top_p is None:
        return top_logits.softmax(dim=-1), indices
    probs = (top_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()
    weights = probs * ((probs.cumsum(dim=-1) - probs) < top_p)  # the best expert is always kept
    return weights / weights.sum(dim=-1, keepdim=True), indices


def candidate_experts(global_logits: torch.Tensor, m: int) -> torch.Tensor:
    """Each query's candidate experts for `router_candidates = m`: `[batch, W]` expert ids, -1 for an empty slot.

    A query with a global term keeps its m best experts by its global logits (ties broken as `torch.topk` does); a
    query whose global logits are all zero (no instruction, or alpha = 0) keeps every expert. W is m, or the number
    of experts when some query keeps every expert (the others' rows padded with -1), so that shapes do not depend on
    the data row by row. Telling the two apart waits for the device once: call this once per model call, not per
    linear (the model does, and `generate` passes the result on to every decoding step).
    """
    top = global_logits.topk(m, dim=-1).indices
    has_global = (global_logits != 0).any(dim=-1, keepdim=True)
    if bool(has_global.all()):
        return top
    num_experts = global_logits.shape[-1]
    every = torch.arange(num_experts, device=global_logits.device).expand(len(global_logits), num_experts)
    return torch.where(has_global, F.pad(top, (0, num_experts - m), value=-1), every)


def candidates_are_exact(global_logits: torch.Tensor, top_k: int, m: int, max_d_in: int) -> torch.Tensor:
    """Per query, `[batch]` bool: whether `router_candidates = m` provably routes like every expert being a candidate,
    top-k with Phatgoose local routers, at every linear that all experts adapt.

    Phatgoose's local logit is bounded: `|LN(x) . LN(v)| / sqrt(d) <= sqrt(d)`, a LayerNorm without affine parameters
    having norm at most `sqrt(d)`. With `g_(j)` the query's j-th largest global logit, each of its k best candidates
    has a logit of at least `g_(k) - sqrt(d)`, and every other expert one of at most `g_(m+1) + sqrt(d)`: when
    `g_(k) - g_(m+1) > 2 sqrt(d)` at the widest routed linear, no non-candidate can enter the top-k, and the kept
    logits, hence the weights, are the same. Queries without a global term keep every expert: exact. Arrow's local
    logits `|x . v| / T` have no such bound; top-p sees only the candidates' mass, so it is not covered either.
    """
    has_global = (global_logits != 0).any(dim=-1)
    if m >= global_logits.shape[-1]:
        return torch.ones_like(has_global)
    ranked = global_logits.float().topk(m + 1, dim=-1).values
    return ~has_global | (ranked[:, top_k - 1] - ranked[:, m] > 2 * math.sqrt(max_d_in))


def route_siblings(
    linears: tuple["GliderLinear", ...], x: torch.Tensor, global_routing_logits: torch.Tensor | None = None, **_
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
    """Each linear's `route(x, global_routing_logits)` for linears that read the same input (q, k, v; wi_0, wi_1),
    computed once for all: one LayerNorm of x, one logits matmul against all their gates (or one per linear, where
    copying the gates together costs more than the operators it saves), one top-k over `[L, ..., E]`.
    Only where they route alike: the same experts, in memory on x's device, among every expert (no `router_candidates`
    narrowing); otherwise None for each, and each linear routes itself. The other routing arguments (`**_`) do not
    change the weights of this path."""
    first = linears[0]
    if not all(isinstance(linear, GliderLinear) for linear in linears):  # e.g. swapped for another implementation
        return (None,) * len(linears)
    config = first.config
    if (
        not first.num_experts
        or config.expert_offload is not None
        or (config.router_candidates is not None and global_routing_logits is not None)
        or any(linear.expert_ids != first.expert_ids for linear in linears)
        # an accelerate device map that offloads weights brings them (from "meta") only into each linear's own call
        or any(linear.router_gate.device != x.device for linear in linears)
    ):
        return (None,) * len(linears)
    tokens = x.reshape(-1, x.shape[-1])
    if config.local_router == "arrow":

        def local_logits(gates):
            return arrow_logits(tokens, gates, config.arrow_temperature)
    else:
        tokens = phatgoose_inputs(tokens)  # LN(x), once for all

        def local_logits(gates):
            return tokens @ phatgoose_gates(gates).mT

    # One matmul against every gate needs them in one tensor: a copy, worth it where it moves fewer bytes than the
    # three operators per further linear it saves cost (the cost model of `fast_lora.py`): small gates, few experts.
    gates = [linear.router_gate for linear in linears]
    if 2 * sum(gate.nbytes for gate in gates) <= 3 * (len(gates) - 1) * OPERATOR_BYTES[device_kind(x.device)]:
        logits = local_logits(torch.stack(gates))  # [L, tokens, E]
    else:
        logits = torch.stack([local_logits(gate) for gate in gates])
    logits = logits.view(len(linears), *x.shape[:-1], first.num_experts)  # [L, batch, tokens, E], rows contiguous
    if global_routing_logits is not None:
        global_logits = global_routing_logits.to(x.device)
        if not first.routes_all_experts:
            global_logits = global_logits.index_select(-1, first.expert_index)
        logits = logits + global_logits[:, None, :]
    reference = config.routing_compatibility == "reference"
    weights, indices = glider_routing_weights(logits, None, config.router_top_k, config.router_top_p, reference)
    return tuple(zip(weights, indices))


class RoutingRecord:
    """The experts every token used at every routed linear, over one forward or one whole `generate` call.

    Each T5 stack tells the record which of its tokens are real (`set_token_masks`): padding of the inputs and the
    pad tokens `generate` feeds to finished rows are routed like any token, but do not count in the usage shares.
    """

    def __init__(self, ended_token_ids: list[int] | None = None):
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = defaultdict(list)
        self.token_masks: dict[str, torch.Tensor | None] = {}
        # The pad and end-of-sequence ids `generate` feeds to rows that have ended (None: the model config's).
        self.ended_token_ids = ended_token_ids

    def set_token_masks(self, **masks: torch.Tensor | None) -> None:
        """`[rows, tokens]` masks (1 = a real token) of the calls that follow: `encoder`, `decoder`, and `cross` (the
        encoder states that the decoder's cross-attention keys and values read)."""
        self.token_masks.update(masks)

    def add(self, module_path: str, weights: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """`weights`, `expert_ids`: `[batch, tokens, k]`, ids in the model's expert numbering."""
        if module_path.startswith("encoder."):
            mask = self.token_masks.get("encoder")
        elif module_path.endswith(("EncDecAttention.k", "EncDecAttention.v")):
            mask = self.token_masks.get("cross")
        else:
            mask = self.token_masks.get("decoder")
        if mask is not None and tuple(mask.shape) != tuple(weights.shape[:2]):
            mask = None  # not a mask of these tokens (a call outside the stacks): count them all
        self.calls[module_path].append((weights.detach(), expert_ids.detach(), mask))

    def module_usage(self, num_experts: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Per routed linear, each query's mean routing weight on every expert over its real tokens,
        `[batch_size, num_experts]`.

        Calls with more rows than `batch_size` (beam search, `num_return_sequences`) fold consecutive rows onto
        their query, as `generate` lays them out.
        """
        usage = {}
        for module_path, calls in self.calls.items():
            total = torch.zeros(batch_size, num_experts)
            tokens = torch.zeros(batch_size, 1)
            for weights, expert_ids, mask in calls:
                rows, length, _ = weights.shape
                if rows % batch_size:
                    raise ValueError(
                        f"{module_path} routed {rows} rows in one call, which do not fold onto batch_size = "
                        f"{batch_size} queries; give the number of queries of the recorded calls."
                    )
                mask = torch.ones(rows, length) if mask is None else mask.detach().float().cpu()
                query = torch.arange(rows) // (rows // batch_size)
                dense = torch.zeros(rows, length, num_experts).scatter_add_(-1, expert_ids.cpu(), weights.float().cpu())
                total.index_add_(0, query, (dense * mask[..., None]).sum(dim=1))
                tokens.index_add_(0, query, mask.sum(dim=1, keepdim=True))
            usage[module_path] = total / tokens.clamp(min=1)
        return usage

    def expert_usage(self, num_experts: int, batch_size: int) -> torch.Tensor:
        """Each query's mean routing weight on every expert over all routed linears, `[batch_size, num_experts]`."""
        return torch.stack(list(self.module_usage(num_experts, batch_size).values())).mean(dim=0)


class GliderLinear(nn.Linear):
    """An `nn.Linear` of the base T5 plus the LoRA experts that adapt it, routed per token.

    The base weight keeps T5's name (`weight`), so plain T5 checkpoints load into it. Expert tensors are stacked,
    ranks zero-padded to the largest rank at this linear (padding adds exactly zero): `lora_A` `[E, r, d_in]`,
    `lora_B` `[E, d_out, r]`, `router_gate` `[E, d_in]` (Phatgoose gate or Arrow prototype). Which experts these
    are, their ranks and scalings all follow from the config; a linear no expert adapts is a plain linear.
    """

    def __init__(self, config, module_path: str, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.config = config
        self.module_path = module_path
        self.set_experts()

    def set_experts(self, tensors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Derive which experts adapt this linear, their ranks and scalings from `self.config`, and (re)allocate the
        stacked expert tensors: zero, or filled from `tensors` (expert id -> unpadded `A [r, d_in]`, `B [d_out, r]`,
        `gate [d_in]`). Adding or removing an expert is: change the config, then call this with every expert's tensors.
        """
        experts = self.config.module_experts(self.module_path)
        self.expert_ids = [e for e, _, _ in experts]
        self.expert_ranks = [r for _, r, _ in experts]
        self.expert_scalings = [s for _, _, s in experts]
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        offloaded = self.num_experts and self.config.expert_offload is not None
        if self.num_experts and not offloaded:
            lora_A, lora_B, router_gate = (torch.zeros(shape, **factory) for shape in self.expert_tensor_shapes())
            for slot, (expert_id, rank) in enumerate(zip(self.expert_ids, self.expert_ranks)):
                if tensors is not None:  # ranks zero-padded to the largest rank here
                    A, B, gate = tensors[expert_id]
                    lora_A[slot, :rank], lora_B[slot, :, :rank], router_gate[slot] = A, B, gate
            self.lora_A, self.lora_B, self.router_gate = map(nn.Parameter, (lora_A, lora_B, router_gate))
        else:
            for name in ("lora_A", "lora_B", "router_gate"):
                self.register_parameter(name, None)
        # Offloaded experts (see `offload.py`): the linear holds the cache's rows only, one per cache slot.
        for name, shape in zip(("cached_lora_A", "cached_lora_B", "cached_router_gate"), self.expert_tensor_shapes()):
            rows = torch.zeros(self.config.expert_cache_capacity, *shape[1:], **factory) if offloaded else None
            self.register_buffer(name, rows, persistent=False)
        # Derived from the config, so not saved; `_init_weights` rebuilds them after a meta-device load.
        device = self.weight.device
        scalings = torch.tensor(self.expert_scalings, dtype=torch.float32, device=device)
        self.register_buffer("lora_scaling", scalings, persistent=False)
        self.register_buffer(
            "expert_index", torch.tensor(self.expert_ids, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer("expert_slot", self.expert_slots().to(device), persistent=False)
        # Config-derived shortcuts of the fast path: one scaling for all experts; the global logits need no selection.
        self.uniform_scaling = self.expert_scalings[0] if len(set(self.expert_scalings)) == 1 else None
        self.routes_all_experts = self.expert_ids == list(range(len(self.config.experts)))

    def expert_tensor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The shapes of the stacked `lora_A`, `lora_B` and `router_gate` that the config implies for this linear."""
        num_experts, max_rank = len(self.expert_ids), max(self.expert_ranks, default=0)
        return (
            (num_experts, max_rank, self.in_features),
            (num_experts, self.out_features, max_rank),
            (num_experts, self.in_features),
        )

    def expert_slot_of(self, expert_id: int) -> int | None:
        """The slot of expert `expert_id` (the model's numbering) in this linear's stacked tensors, None if it adapts
        none."""
        return self.expert_ids.index(expert_id) if expert_id in self.expert_ids else None

    def expert_slots(self) -> torch.Tensor:
        """Expert id (the model's numbering) -> its slot in this linear's stacked tensors, -1 where it adapts none."""
        slots = torch.full((len(self.config.experts),), -1, dtype=torch.long)
        slots[self.expert_ids] = torch.arange(len(self.expert_ids))
        return slots

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` casts every float buffer; the scalings stay fp32 (PEFT keeps them as Python floats), rebuilt
        # from the config on the module's new device.
        super()._apply(fn, recurse)
        if self.lora_scaling.dtype != torch.float32:
            self.lora_scaling = torch.tensor(self.expert_scalings, dtype=torch.float32, device=self.lora_scaling.device)
        return self

    def expert_tensors(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Expert id -> this linear's unpadded `(A [r, d_in], B [d_out, r], gate [d_in])` of that expert."""
        if self.config.expert_offload is not None:
            raise ValueError(
                f"{self.module_path}: the experts are offloaded (expert_offload={self.config.expert_offload!r}); load "
                "the model without expert_offload to read or change them."
            )
        return {
            expert_id: (self.lora_A[slot, :rank], self.lora_B[slot, :, :rank], self.router_gate[slot])
            for slot, (expert_id, rank) in enumerate(zip(self.expert_ids, self.expert_ranks))
        }

    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)

    def forward(
        self,
        x: torch.Tensor,
        global_routing_logits: torch.Tensor | None = None,
        routing_record: RoutingRecord | None = None,
        routing_candidates: torch.Tensor | None = None,
        expert_lease=None,
        sibling_routing: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`sibling_routing`: this linear's `route(x, ...)`, computed together with linears that read the same `x`
        (`route_siblings`)."""
        y = super().forward(x)
        if not self.num_experts:
            return y
        lora_A, lora_B, gates, rows = self.expert_storage(expert_lease)
        if sibling_routing is None:
            weights, indices = self.route(x, global_routing_logits, routing_candidates, gates, rows)
        else:
            weights, indices = sibling_routing
            if weights.shape[:-1] != x.shape[:-1] or indices.shape != weights.shape:
                raise ValueError(
                    f"{self.module_path}: sibling_routing holds weights {tuple(weights.shape)} and indices "
                    f"{tuple(indices.shape)}, not the routing of inputs {tuple(x.shape)} (see route_siblings)."
                )
        if routing_record is not None:
            routing_record.add(self.module_path, weights, self.expert_index[indices])
        if self.config.lora_implementation == "dense":
            if rows is not None:  # every expert of this linear: the ones not leased have weight 0
                lora_A, lora_B = lora_A.index_select(0, rows.clamp(min=0)), lora_B.index_select(0, rows.clamp(min=0))
            return y + self.mixture_of_lora(x, weights, indices, lora_A, lora_B)
        stored = self.stored_rows(indices, rows, weights)
        # on CPU, from 8 rows on: the experts in use, which "auto" and the gather path count ("grouped" counts its own)
        in_use = None if self.config.lora_implementation == "grouped" else experts_in_use(stored, x)
        if self.uniform_scaling is None:
            weights, scaling = weights * self.lora_scaling[indices], 1.0
        else:  # applied once, where the mixture is added to y
            scaling = self.uniform_scaling
        if self.lora_implementation(x, lora_A, lora_B, in_use) == "gather":
            return gathered_mixture_of_lora(y, x, weights.to(x.dtype), stored, lora_A, lora_B, scaling, in_use)
        return grouped_mixture_of_lora(y, x, weights.to(x.dtype), stored, lora_A, lora_B, scaling)

    def expert_storage(self, expert_lease) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The tensors that hold this linear's experts (`lora_A`, `lora_B`, `router_gate`) and, when the experts are
        offloaded, each expert slot's row in the cache that holds them instead, `[E]` (-1: not leased by this call)."""
        if self.config.expert_offload is None:
            return self.lora_A, self.lora_B, self.router_gate, None
        if expert_lease is None or not expert_lease.active:
            raise ValueError(
                f"{self.module_path}: the experts are offloaded, and a routed linear is only called by the model, "
                "which leases the experts a call may use (expert_lease)."
            )
        rows = expert_lease.slots_on(self.weight.device).index_select(0, self.expert_index)
        return self.cached_lora_A, self.cached_lora_B, self.cached_router_gate, rows

    @staticmethod
    def stored_rows(slots: torch.Tensor, rows: torch.Tensor | None, weights: torch.Tensor) -> torch.Tensor:
        """Where the experts at `slots` lie in the tensors of `expert_storage`. A slot that weighs 0 (padding of the
        candidate path) may name an expert the call did not lease: it reads row 0, which holds finite values."""
        if rows is None:
            return slots
        stored = rows[slots]
        torch._assert_async(((stored >= 0) | (weights == 0)).all(), "routed to an expert the call did not lease")
        return stored.clamp(min=0)

    def lora_implementation(
        self,
        x: torch.Tensor,
        lora_A: torch.Tensor | None = None,
        lora_B: torch.Tensor | None = None,
        in_use: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> str:
        """What computes a call on input `x`: `config.lora_implementation`; "auto" is the formulation `mixture_costs`
        finds cheapest for the call's shapes and, where known (`in_use`, from `experts_in_use`), the number of experts
        in use (see `fast_lora.py`); "gather" in compiled graphs (the grouped loop is not traceable). `lora_A`, `lora_B`:
        where the experts lie (default: this linear's own)."""
        implementation = self.config.lora_implementation
        if implementation != "auto":
            return implementation
        if torch.compiler.is_compiling():
            return "gather"
        lora_A = self.lora_A if lora_A is None else lora_A
        lora_B = self.lora_B if lora_B is None else lora_B
        return cheapest_mixture(
            x.shape[:-1].numel(),
            min(self.config.router_top_k, self.num_experts),
            lora_A.shape[0],
            lora_A.shape[1],
            self.in_features,
            self.out_features,
            x.element_size(),
            x.device.type,
            grouped_mm_applies(x, lora_A, lora_B, aligned=False),
            None if in_use is None else in_use[0].numel(),
        )

    def routing_logits(
        self, x: torch.Tensor, global_routing_logits: torch.Tensor | None, gates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`local_e(x) + alpha * cos(u, G_e)` over the experts of this linear, fp32 `[batch, tokens, E]`, for input `x`
        `[batch, tokens, d_in]` and the query's global logits `[batch, all experts]` (None: local only). `gates`: the
        experts' gates in slot order (default: `router_gate`)."""
        gates = self.router_gate if gates is None else gates
        if self.config.local_router == "arrow":
            logits = arrow_logits(x, gates, self.config.arrow_temperature)
        else:
            logits = phatgoose_logits(x, phatgoose_gates(gates))  # no cache of them: it could go stale
        if global_routing_logits is not None:
            global_logits = global_routing_logits.to(x.device)
            if not self.routes_all_experts:
                global_logits = global_logits.index_select(-1, self.expert_index)
            logits = logits + global_logits[:, None, :]
        return logits

    def route(
        self,
        x: torch.Tensor,
        global_routing_logits: torch.Tensor | None,
        routing_candidates: torch.Tensor | None = None,
        gates: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights and local expert indices per token, `[batch, tokens, k]` (see `glider_routing_weights`).

        With `config.router_candidates` set and a global term, only the query's candidates (`routing_candidates`, from
        `candidate_experts`; computed here if not given) that adapt this linear are scored; slots of candidates that
        do not adapt it weigh 0 and point at slot 0. `gates` and `rows`: where the gates lie (`expert_storage`)."""
        config = self.config
        gates = self.router_gate if gates is None else gates
        if config.router_candidates is None or global_routing_logits is None:
            if rows is not None:  # offloaded: every expert of this linear was leased
                torch._assert_async((rows >= 0).all(), "a call routing among all experts did not lease them all")
                gates = gates.index_select(0, rows.clamp(min=0))
            logits = self.routing_logits(x, global_routing_logits, gates)
            reference = config.routing_compatibility == "reference"
            return glider_routing_weights(logits, None, config.router_top_k, config.router_top_p, reference)
        global_logits = global_routing_logits.to(x.device)
        if routing_candidates is None:
            routing_candidates = candidate_experts(global_logits, config.router_candidates)
        candidates = routing_candidates.to(x.device)
        slots = self.expert_slot[candidates.clamp(min=0)].masked_fill(candidates < 0, -1)  # [batch, W]
        selectable = slots >= 0
        slots = slots.clamp(min=0)
        batch, width = slots.shape
        stored = slots if rows is None else rows[slots].clamp(min=0)  # candidates of this linear are leased
        gates = gates.index_select(0, stored.reshape(-1)).view(batch, width, self.in_features)
        if config.local_router == "arrow":
            logits = (x.float() @ gates.float().transpose(1, 2)).abs() / config.arrow_temperature
        else:
            x_normalised = F.layer_norm(x.float(), x.shape[-1:], eps=ROUTER_LAYER_NORM_EPS)
            logits = x_normalised @ phatgoose_gates(gates).transpose(1, 2)  # [batch, tokens, W]
        logits = logits + global_logits.float().gather(-1, candidates.clamp(min=0))[:, None, :]
        # A finite floor rather than -inf: a linear that no candidate adapts must give weights 0, not NaN.
        logits = logits.masked_fill(~selectable[:, None, :], torch.finfo(torch.float32).min)
        weights, picked = glider_routing_weights(logits, None, config.router_top_k, config.router_top_p)
        picked_selectable = selectable[:, None, :].expand_as(logits).gather(-1, picked)
        weights = torch.where(picked_selectable, weights, 0.0)
        return weights, slots[:, None, :].expand_as(logits).gather(-1, picked)

    def mixture_of_lora(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        indices: torch.Tensor,
        lora_A: torch.Tensor | None = None,
        lora_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sum_e w_e s_e B_e A_e x. Reference path: every expert is computed, unselected ones with w_e = 0. `lora_A`,
        `lora_B`: the experts' tensors in slot order (default: this linear's own)."""
        lora_A = self.lora_A if lora_A is None else lora_A
        lora_B = self.lora_B if lora_B is None else lora_B
        dense_weights = torch.zeros(*weights.shape[:-1], self.num_experts, device=x.device)
        # scatter_add: slots weighing 0 may repeat a selected slot (candidates that do not adapt this linear)
        dense_weights = dense_weights.scatter_add(-1, indices, weights) * self.lora_scaling
        hidden = torch.einsum("btd,erd->bter", x, lora_A.to(x.dtype))
        return torch.einsum("bter,bte,eor->bto", hidden, dense_weights.to(x.dtype), lora_B.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, max_rank={max(self.expert_ranks, default=0)}"


# How `fit_expert_descriptors` fits: temperature of its softmax over cosines, full-batch Adam steps and step size.
DESCRIPTOR_TEMPERATURE = 10.0
DESCRIPTOR_STEPS = 300
DESCRIPTOR_LEARNING_RATE = 1e-2


def fit_expert_descriptors(
    instruction_embeddings: torch.Tensor, samples: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """Expert descriptors fitted to embedded samples of the experts' inputs: unit vectors W_e such that
    `softmax_e(T cos(s, W_e))` names the expert of every sample s (a cosine classifier over the library; cross-entropy,
    each expert's samples weighted equally). `samples` `[E, N, D]` holds `counts[e]` rows for expert e. Starts from
    each expert's sample centroid; an expert without samples keeps its instruction embedding (nothing to fit, but its
    descriptor still competes). Deterministic: no random initialisation, full batches. -> `[E, D]` fp32.
    """
    with torch.enable_grad(), torch.inference_mode(False):
        G = F.normalize(instruction_embeddings.detach().float().clone(), dim=-1)
        counts_t = torch.tensor(counts, device=G.device)
        mask = torch.arange(samples.shape[1], device=G.device)[None, :] < counts_t[:, None]  # [E, N]
        samples = samples.detach().float().clone()  # an ordinary tensor, also when called under inference mode
        X = F.normalize(samples[mask], dim=-1)  # [S, D]
        labels = torch.arange(len(counts), device=G.device)[:, None].expand_as(mask)[mask]
        weights = 1.0 / counts_t[labels].float()
        fitted = counts_t > 0
        centroids = samples.sum(dim=1) / counts_t.clamp(min=1)[:, None]
        W = torch.where(fitted[:, None], F.normalize(centroids, dim=-1), G).requires_grad_()
        optimizer = torch.optim.Adam([W], lr=DESCRIPTOR_LEARNING_RATE)
        for _ in range(DESCRIPTOR_STEPS if len(X) else 0):
            descriptors = torch.where(fitted[:, None], F.normalize(W, dim=-1), G)
            losses = F.cross_entropy(DESCRIPTOR_TEMPERATURE * X @ descriptors.T, labels, reduction="none")
            loss = (losses * weights).sum() / fitted.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return torch.where(fitted[:, None], F.normalize(W.detach(), dim=-1), G)


class GliderGlobalRouter(nn.Module):
    """GLIDER's global router: `alpha * score(u, e)`, one bias per query and expert for every routed linear.

    `score(u, e) = cos(u, G_e)` with G_e what `config.global_routing_descriptor` names: the expert's instruction
    embedding (`expert_embeddings`, the paper), a descriptor fitted to embedded samples of its inputs
    (`expert_descriptors`, fitted from `expert_samples` whenever the library changes), or the mean of both cosines.
    alpha follows `config.global_routing_policy`: fixed, or per query by a threshold on its best score. A row of zeros
    in the instruction embeddings means "no instruction for this query" (e.g. its instruction could not be written):
    that row gets no global term, so the query is routed by the local routers alone.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.register_buffer("expert_embeddings", torch.zeros(len(config.experts), config.instruction_embedding_dim))
        self.register_samples(config.max_samples)

    def register_samples(self, max_samples: int) -> None:
        """(Re)make `expert_samples` `[E, N, D]` (expert e's `experts[e]["samples"]` first rows; zeros after) and
        `expert_descriptors` `[E, D]`, or none when no expert has samples."""
        shape = (len(self.config.experts), self.config.instruction_embedding_dim)
        device = self.expert_embeddings.device
        samples = torch.zeros(shape[0], max_samples, shape[1], device=device) if max_samples else None
        self.register_buffer("expert_samples", samples)
        self.register_buffer("expert_descriptors", torch.zeros(shape, device=device) if max_samples else None)

    def set_experts(self, embeddings: torch.Tensor, samples: list[torch.Tensor | None]) -> None:
        """Install the experts' instruction embeddings `[E, D]` and embedded samples (per expert `[n_e, D]` or None, n_e
        as the config says) and fit the descriptors (the config must already list these experts)."""
        self.expert_embeddings = embeddings.float().to(self.expert_embeddings.device)
        self.register_samples(self.config.max_samples)
        if self.expert_samples is not None:
            for e, rows in enumerate(samples):
                if rows is not None:
                    self.expert_samples[e, : len(rows)] = rows.float()
            counts = [expert["samples"] for expert in self.config.experts]
            self.expert_descriptors = fit_expert_descriptors(self.expert_embeddings, self.expert_samples, counts)

    def expert_sample_rows(self) -> list[torch.Tensor | None]:
        """Each expert's embedded samples `[n_e, D]`, or None."""
        counts = [expert["samples"] for expert in self.config.experts]
        return [self.expert_samples[e, :n] if n else None for e, n in enumerate(counts)]

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        """score(u, e) in [-1, 1] for `[batch, D]` query embeddings: `[batch, E]` fp32."""
        G = self.expert_embeddings.float()
        u = u.float().to(G.device)
        if self.config.routing_compatibility == "reference":
            # the authors' code drops the last value of every instruction embedding (`embedding[:-1]`), both sides
            u, G = u[:, :-1], G[:, :-1]
        u = F.normalize(u, dim=-1)
        descriptor = self.config.global_routing_descriptor
        if descriptor == "instruction":
            return u @ F.normalize(G, dim=-1).T
        fitted = u @ F.normalize(self.expert_descriptors.float(), dim=-1).T
        return fitted if descriptor == "samples" else (u @ F.normalize(G, dim=-1).T + fitted) / 2

    def forward(self, instruction_embeddings: torch.Tensor) -> torch.Tensor:
        """`[batch, D]` instruction embeddings -> `[batch, num_experts]` global routing logits (fp32)."""
        u = instruction_embeddings
        width = self.config.instruction_embedding_dim
        if not isinstance(u, torch.Tensor) or u.dim() != 2 or u.shape[-1] != width:
            shape = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(
                f"instruction_embeddings must be a float tensor [batch, {width}] (one row per query, embedded with "
                f"{self.config.instruction_embedding_model or 'the experts’ embedding model'}), got {shape}."
            )
        if not torch.is_floating_point(u):
            raise ValueError(f"instruction_embeddings must be a float tensor, got dtype {u.dtype}.")
        if not torch.isfinite(u).all():
            bad = (~torch.isfinite(u)).any(dim=-1).nonzero().flatten().tolist()
            raise ValueError(f"instruction_embeddings rows {bad} hold NaN or inf.")
        has_instruction = (u != 0).any(dim=-1, keepdim=True).to(self.expert_embeddings.device)
        score = self.scores(u)
        config = self.config
        if config.global_routing_policy == "threshold":
            matches_an_expert = score.max(dim=-1, keepdim=True).values >= config.global_routing_threshold
            alpha = torch.where(
                matches_an_expert, config.global_routing_scale, config.global_routing_scale_unmatched
            ).float()
        else:
            alpha = torch.full((len(u), 1), float(config.global_routing_scale), device=score.device)
        return torch.where(has_instruction, alpha * score, 0.0)
