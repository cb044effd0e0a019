"""The reference GLIDER routed layer's way of computing a mixture of LoRA experts, rebuilt for comparison.

GLIDER's public code (UNITES-Lab/glider, after Phatgoose, r-three/phatgoose) keeps one small module per expert and,
at every routed linear and every call, does:

1. the base linear; router logits `gate(LN(x)) / sqrt(d_in)` over ALL experts (gate rows are LN(v_e), normalised
   once ahead), plus the global routing bias;
2. an fp32 softmax over all experts, top-k, renormalisation (`/ (sum + 1e-6)`) and a dense, mostly zero
   `[tokens, E]` weight matrix;
3. `nonzero` on that matrix, sorted by expert; the token rows copied in that order and split by expert;
4. a Python loop over EVERY expert, each running its `lora_B(lora_A(dropout(x))) * scaling` (also on an empty
   split), then a concatenation, the weights multiplied in and an `index_add` back to token order;
5. a per-expert usage counter updated on the host.

`ReferenceLoopLinear` re-implements that behaviour (written here, not copied) with GliderT5's routing inputs, so a
GliderT5 whose linears are swapped for it runs the same routing formula at the reference's cost. Only top-k
routing (no top-p) is rebuilt: the benchmark does not need more.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.routing import ROUTER_LAYER_NORM_EPS, GliderLinear


class ReferenceExpert(nn.Module):
    """One expert's LoRA as the reference keeps it: two bias-free linears, dropout and a scaling."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
        super().__init__()
        self.lora_A = nn.Linear(lora_A.shape[1], lora_A.shape[0], bias=False, device="meta")
        self.lora_B = nn.Linear(lora_B.shape[1], lora_B.shape[0], bias=False, device="meta")
        self.lora_A.weight = nn.Parameter(lora_A, requires_grad=False)  # views: no copy of the library
        self.lora_B.weight = nn.Parameter(lora_B, requires_grad=False)
        self.dropout = nn.Dropout(0.0)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class ReferenceLoopLinear(nn.Linear):
    """A GliderLinear's math, computed the reference way: dense routing, a sort, and a loop over every expert."""

    def __init__(self, linear: GliderLinear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.module_path, self.top_k = linear.module_path, linear.config.router_top_k
        config = linear.config
        if (
            config.router_top_p is not None
            or config.local_router != "phatgoose"
            or config.routing_compatibility != "glider"
        ):
            raise ValueError("The reference loop is rebuilt for top-k Phatgoose/GLIDER routing only.")
        self.num_experts = linear.num_experts
        self.register_buffer("expert_index", linear.expert_index.clone(), persistent=False)
        if not self.num_experts:
            return
        self.experts = nn.ModuleList(
            ReferenceExpert(linear.lora_A.data[e, :rank], linear.lora_B.data[e, :, :rank], linear.expert_scalings[e])
            for e, rank in enumerate(linear.expert_ranks)
        )
        self.gate = nn.Linear(linear.in_features, self.num_experts, bias=False, device="meta")
        normalised = F.layer_norm(linear.router_gate.data.float(), (self.in_features,), eps=ROUTER_LAYER_NORM_EPS)
        self.gate.weight = nn.Parameter(normalised.to(linear.router_gate.dtype), requires_grad=False)
        self.input_layer_norm = nn.LayerNorm(self.in_features, eps=ROUTER_LAYER_NORM_EPS, elementwise_affine=False)
        self.routing_counter = torch.zeros(self.num_experts, dtype=torch.long)

    def forward(
        self,
        x,
        global_routing_logits=None,
        routing_record=None,
        routing_candidates=None,
        expert_lease=None,
        sibling_routing=None,  # not used: the reference routes every linear on its own
    ):
        if routing_candidates is not None:
            raise ValueError("The reference loop is rebuilt for routing among every expert (router_candidates=None).")
        if expert_lease is not None:
            raise ValueError(
                "The reference loop is rebuilt from a model with its experts in memory (no expert_offload)."
            )
        out = F.linear(x, self.weight, self.bias)
        if not self.num_experts:
            return out
        batch, length, d_in = x.shape
        logits = self.gate(self.input_layer_norm(x)) * math.sqrt(1 / d_in)
        if global_routing_logits is not None:
            logits = logits + global_routing_logits.index_select(-1, self.expert_index)[:, None, :]
        probs = F.softmax(logits, dim=-1, dtype=torch.float).reshape(-1, self.num_experts)
        top_weights, top_indices = probs.topk(min(self.top_k, self.num_experts), dim=-1)
        top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + 1e-6)
        dense = torch.zeros_like(probs).scatter(1, top_indices, top_weights)

        pairs = torch.nonzero(dense)  # (token, expert), token-major
        by_expert, order = pairs.sort(dim=0)
        expert_of_pair = by_expert[:, 1:]
        token_of_pair = pairs[order[:, 1], 0]
        sizes = (dense > 0).sum(dim=0).tolist()
        pair_weights = torch.gather(dense[token_of_pair], 1, expert_of_pair)
        inputs = torch.split(x.reshape(-1, d_in)[token_of_pair], sizes, dim=0)
        outputs = [expert(part) for expert, part in zip(self.experts, inputs)]
        mixed = torch.cat(outputs, dim=0) * pair_weights.to(x.dtype)
        lora = torch.zeros(batch * length, self.out_features, dtype=mixed.dtype, device=x.device).index_add(
            0, token_of_pair, mixed
        )

        with torch.no_grad():
            self.routing_counter += F.one_hot(expert_of_pair.flatten(), self.num_experts).sum(dim=0).cpu()
        return out + lora.view(batch, length, -1).to(out.dtype)


def reference_loop_model(glider: GliderT5ForConditionalGeneration) -> GliderT5ForConditionalGeneration:
    """A GliderT5 sharing `glider`'s weights (no copy) whose routed linears run the reference per-expert loop."""
    with torch.device("meta"):
        model = GliderT5ForConditionalGeneration(glider.config)
    model.load_state_dict(glider.state_dict(), assign=True)
    for path, module in glider.named_modules():
        if isinstance(module, GliderLinear):
            parent, name = path.rsplit(".", 1)
            setattr(model.get_submodule(parent), name, ReferenceLoopLinear(module))
    model.lm_head.weight = glider.lm_head.weight
    return model.eval()
