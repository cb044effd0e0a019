"""Candidate experts per query (`router_candidates = m`) against a naive per-token loop written here from the expert
files alone: each query's m best experts by alpha * cos(u, G_e) are its candidates (all experts without a global
term), the others are masked to -inf, then softmax, top-k (top-p over the candidates' mass), renormalise,
y = W x + sum w s B A x; a linear that no candidate adapts adds nothing. Plus the exactness bound, checked on cases
built to meet it and to miss it by a hair."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from configuration_glider import GliderConfig
from modeling_glider import GliderLinear, GliderT5ForConditionalGeneration
from modeling_glider.routing import candidates_are_exact
from tests.conftest import EMBED_DIM, assert_decisive, make_base, make_expert

PREFIX = "base_model.model."
ALPHA = 2.0  # comparable to the local logits: both terms decide, so the candidates change the routing


class NaiveCandidateLinear(nn.Module):
    """The routing with candidates, token by token and expert by expert, in float64."""

    def __init__(self, linear: nn.Linear, experts: dict[int, dict], num_experts: int, settings: dict):
        super().__init__()
        self.linear, self.experts, self.num_experts, self.settings = linear, experts, num_experts, settings

    @property
    def weight(self):  # T5 reads `wo.weight.dtype`
        return self.linear.weight

    @staticmethod
    def layer_norm(v):
        return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

    def forward(self, x):
        out = self.linear(x).double()
        global_logits, m, top_k, top_p = (self.settings[key] for key in ("global_logits", "m", "top_k", "top_p"))
        for b in range(x.shape[0]):
            g = None if global_logits is None else global_logits[b // (x.shape[0] // len(global_logits))]
            if m is None or g is None or not bool((g != 0).any()):
                candidates = set(range(self.num_experts))
            else:
                candidates = set(torch.topk(g, m).indices.tolist())
            for t in range(x.shape[1]):
                xt = x[b, t].double()
                logits = torch.full((self.num_experts,), -math.inf, dtype=torch.float64)
                for e, expert in self.experts.items():
                    if e in candidates:
                        logit = self.layer_norm(xt) @ self.layer_norm(expert["gate"]) / math.sqrt(xt.numel())
                        logits[e] = logit + (0.0 if g is None else g[e])
                if not torch.isfinite(logits).any():
                    continue  # no candidate adapts this linear
                probs = torch.softmax(logits, dim=0)
                order = sorted(range(self.num_experts), key=lambda i: -probs[i].item())[:top_k]
                order = [i for i in order if probs[i] > 0]  # fewer selectable candidates than k
                if top_p is not None:
                    kept, mass = [], 0.0
                    for i in order:
                        if mass < top_p:
                            kept.append(i)
                        mass += probs[i].item()
                    order = kept
                total = sum(probs[i] for i in order)
                for i in order:
                    e = self.experts[i]
                    out[b, t] += probs[i] / total * e["scaling"] * (e["B"] @ (e["A"] @ xt))
        return out.to(x.dtype)


def naive_model(base, expert_dirs, settings: dict):
    """A copy of the base whose adapted linears are `NaiveCandidateLinear`s, built from the files alone."""
    model = copy.deepcopy(base)
    per_module: dict[str, dict[int, dict]] = {}
    for index, directory in enumerate(expert_dirs):
        adapter = json.loads((directory / "adapter_config.json").read_text())
        weights = load_file(directory / "adapter_model.safetensors")
        extra = load_file(directory / "glider_expert.safetensors")
        for key, A in weights.items():
            if key.endswith(".lora_A.weight"):
                path = key[len(PREFIX) : -len(".lora_A.weight")]
                r = A.shape[0]
                scale = math.sqrt(r) if adapter.get("use_rslora") else r
                per_module.setdefault(path, {})[index] = {
                    "A": A.double(),
                    "B": weights[key.replace("lora_A", "lora_B")].double(),
                    "scaling": adapter["lora_alpha"] / scale,
                    "gate": extra[f"gate.{path}"].double(),
                }
    for path, experts in per_module.items():
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        setattr(parent, name, NaiveCandidateLinear(getattr(parent, name), experts, len(expert_dirs), settings))
    return model.eval()


def naive_global_logits(expert_dirs, u: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * cos(u, G_e) from the files, zero rows of u (no instruction) giving zero rows."""
    G = torch.stack([load_file(d / "glider_expert.safetensors")["instruction_embedding"].double() for d in expert_dirs])
    u = u.double()
    cosine = (u @ G.T) / (u.norm(dim=-1, keepdim=True).clamp(min=1e-300) * G.norm(dim=-1))
    return alpha * cosine * (u != 0).any(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Six experts on different sets of linears (`sparse` adapts k and wi_1 only: with `partial` as the other
    candidate, the o projections have none)."""
    root = tmp_path_factory.mktemp("candidates")
    base = make_base(seed=1, dtype=torch.float64)  # only the fp32 routing differs from the float64 reference
    G = torch.randn(6, EMBED_DIM, generator=torch.Generator().manual_seed(7))
    specs = [
        ("wide", dict(r=2, lora_alpha=4)),
        ("partial", dict(r=4, lora_alpha=8, use_rslora=True, targets=("q", "v", "wi_0", "wo"))),
        ("second_block", dict(r=3, lora_alpha=6, layers=[1])),
        ("wide2", dict(r=4, lora_alpha=4)),
        ("sparse", dict(r=2, lora_alpha=2, targets=("k", "wi_1"))),
        ("wide3", dict(r=2, lora_alpha=8)),
    ]
    dirs = [make_expert(root, base, name, seed=20 + i, embedding=G[i], **kw) for i, (name, kw) in enumerate(specs)]
    return base, dirs, G


def queries(G: torch.Tensor) -> torch.Tensor:
    """Four queries: near expert 0, no instruction (zero row), near expert 4, and an unrelated one."""
    g = torch.Generator().manual_seed(11)
    u = torch.randn(4, EMBED_DIM, generator=g)
    u[0], u[1], u[2] = G[0] + 0.3 * u[0], 0.0, G[4] + 0.3 * u[2]
    return u


def token_inputs(rows: int = 4, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 64, (rows, 7), generator=g), torch.randint(2, 64, (rows, 5), generator=g)


def glider_model(library, **overrides) -> GliderT5ForConditionalGeneration:
    base, dirs, _ = library
    return GliderT5ForConditionalGeneration.from_experts(
        base, dirs, top_k=2, global_routing_scale=ALPHA, **overrides
    ).eval()


@pytest.mark.parametrize(
    "implementation, m, top_p",
    [("dense", 2, None), ("gather", 2, None), ("grouped", 2, None), ("gather", 3, 0.6), ("grouped", 4, None)],
)
@torch.no_grad()
def test_candidates_equal_the_naive_reference(library, implementation, m, top_p):
    base, dirs, G = library
    u = queries(G)
    settings = {"global_logits": naive_global_logits(dirs, u, ALPHA), "m": m, "top_k": 2, "top_p": top_p}
    naive = naive_model(base, dirs, settings)
    glider = glider_model(library, router_top_p=top_p, router_candidates=m, lora_implementation=implementation)
    ids, dec = token_inputs()
    expected = naive(input_ids=ids, decoder_input_ids=dec).logits
    got = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
    torch.testing.assert_close(got, expected, atol=2e-4 * expected.abs().max().item(), rtol=1e-4)
    # not vacuous: the paper's routing (every expert a candidate) gives other answers for the rows with a query...
    glider.config.router_candidates = None
    everyone = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
    assert (everyone - expected)[[0, 2, 3]].abs().max() > 1e-2 * expected.abs().max()
    # ...and the same for the row without an instruction, which keeps every expert
    torch.testing.assert_close(everyone[1], expected[1], atol=2e-4 * expected.abs().max().item(), rtol=1e-4)


@torch.no_grad()
def test_all_experts_as_candidates_equal_no_candidates(library):
    _, _, G = library
    u, (ids, dec) = queries(G), token_inputs()
    glider = glider_model(library)
    expected = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u, output_routing=True)
    glider.config.router_candidates = 6
    got = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u, output_routing=True)
    # fp32 routing of the same logits in another order: rounding, amplified through the layers
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4 * expected.logits.abs().max().item(), rtol=1e-4)
    for usage, reference in zip(got.routing.module_usage(6, 4).values(), expected.routing.module_usage(6, 4).values()):
        torch.testing.assert_close(usage, reference, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_queries_with_a_global_term_use_only_their_candidates(library):
    _, dirs, G = library
    u, (ids, dec) = queries(G), token_inputs()
    glider = glider_model(library, router_candidates=2)
    out = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u, output_routing=True)
    top2 = naive_global_logits(dirs, u, ALPHA).topk(2, dim=-1).indices
    usage = torch.stack(list(out.routing.module_usage(6, 4).values()))  # [linears, queries, experts]
    for row in (0, 2, 3):
        outside = [e for e in range(6) if e not in top2[row].tolist()]
        assert usage[:, row, outside].abs().max() == 0
    assert (usage[:, 1] > 0).sum(dim=0).gt(0).sum() > 2  # the query without instruction reaches beyond two experts


@pytest.mark.parametrize("implementation", ["dense", "gather", "grouped"])
def test_linears_no_candidate_adapts_add_nothing_and_stay_finite(library, implementation):
    base, dirs, _ = library
    glider = glider_model(library, router_candidates=2, lora_implementation=implementation)
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0, 4.0, 0.0], [3.0, 0.0, 0.0, 2.5, 0.0, 0.0]], dtype=torch.float32)
    ids, dec = token_inputs(rows=2)
    for name, parameter in glider.named_parameters():
        parameter.requires_grad_(name.endswith(("lora_A", "lora_B", "router_gate")))
    seen = {}

    def keep(module, args, output):
        seen[module.module_path] = (args[0], output)

    hooks = [m.register_forward_hook(keep) for m in glider.modules() if isinstance(m, GliderLinear) and m.num_experts]
    out = glider(input_ids=ids, decoder_input_ids=dec, global_routing_logits=logits, labels=dec)
    for hook in hooks:
        hook.remove()
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in glider.parameters())
    # Query 0's candidates are `partial` and `sparse`: neither adapts an o projection, which is the plain linear there
    for path in ("encoder.block.0.layer.0.SelfAttention.o", "decoder.block.1.layer.1.EncDecAttention.o"):
        x, y = seen[path]
        weight = glider.get_submodule(path).weight
        torch.testing.assert_close(y[0], x[0] @ weight.T, atol=1e-10, rtol=1e-10)
        assert not torch.allclose(y[1], x[1] @ weight.T)  # query 1's candidates do adapt it
    settings = {"global_logits": logits.double(), "m": 2, "top_k": 2, "top_p": None}
    expected = naive_model(base, dirs, settings)(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(out.logits.detach(), expected, atol=2e-4 * expected.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_generate_equals_the_naive_reference(library, num_beams):
    base, dirs, G = library
    u = queries(G)
    settings = {"global_logits": naive_global_logits(dirs, u, ALPHA), "m": 2, "top_k": 2, "top_p": None}
    naive = naive_model(base, dirs, settings)
    glider = glider_model(library, router_candidates=2)
    ids, _ = token_inputs()
    options = dict(max_new_tokens=5, num_beams=num_beams, do_sample=False, output_scores=True)
    options.update(return_dict_in_generate=True, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    expected = naive.generate(input_ids=ids, **options)
    assert_decisive(expected, num_beams=num_beams)
    got = glider.generate(ids, instruction_embeddings=u, **options)
    assert torch.equal(got.sequences, expected.sequences)
    if num_beams > 1:
        scale = expected.sequences_scores.abs().max().item()
        torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=1e-4 * scale, rtol=1e-4)


# Exactness: Phatgoose's local logit lies in [-sqrt(d), sqrt(d)], so a global gap g_(k) - g_(m+1) > 2 sqrt(d) keeps
# every non-candidate out of the top-k.


def test_phatgoose_local_logits_lie_within_sqrt_d():
    d = 48
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, d, generator=g) * 100
    x = torch.cat([v, -v, torch.randn(200, d, generator=g) * 10])  # x = v reaches the bound, x = -v its negative
    ln = lambda t: (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)  # noqa: E731
    local = ln(x.double()) @ ln(v.double()).T / math.sqrt(d)
    assert local.abs().max() <= math.sqrt(d) and local.max() > math.sqrt(d) * (1 - 1e-6)


def single_linear(d: int, gap: float) -> tuple[GliderLinear, torch.Tensor, torch.Tensor]:
    """Four experts, top-1, one candidate: the candidate's gate points away from x, expert 1's at it, and expert 1's
    global logit is `gap` below the candidate's; the others are far below."""
    experts = [{"name": f"e{i}", "target_modules": ["q"], "r": 2, "lora_alpha": 2} for i in range(4)]
    config = GliderConfig(experts=experts, router_top_k=1, d_model=d)
    linear = GliderLinear(config, "encoder.block.0.layer.0.SelfAttention.q", d, d)
    v = torch.randn(d, generator=torch.Generator().manual_seed(3)) * 50
    gates = [-v, v, torch.randn(d), torch.randn(d)]
    with torch.no_grad():
        linear.set_experts({i: (torch.randn(2, d), torch.randn(d, 2), gates[i]) for i in range(4)})
    global_logits = torch.tensor([[10.0, 10.0 - gap, -100.0, -100.0]])
    return linear, v.view(1, 1, d), global_logits


@pytest.mark.parametrize("margin, exact", [(1.01, True), (0.99, False)])
@torch.no_grad()
def test_the_bound_is_tight_at_one_linear(margin, exact):
    d = 16
    linear, x, global_logits = single_linear(d, margin * 2 * math.sqrt(d))
    assert candidates_are_exact(global_logits, 1, 1, d).tolist() == [exact]
    _, everyone = linear.route(x, global_logits)
    linear.config.router_candidates = 1
    _, candidates = linear.route(x, global_logits)
    assert candidates.item() == 0  # the one candidate
    assert everyone.item() == (0 if exact else 1)  # missed by 1%, the non-candidate wins without candidates


@pytest.mark.parametrize(
    "logits, exact",
    [
        ([[40.0, 30.0, 5.0, 0.0, -3.0, 1.0], [0.0] * 6, [-2.0, 30.0, 45.0, 29.0, 0.0, 10.0]], True),
        ([[2.0, 1.5, 1.2, 1.0, 0.5, 0.2], [0.3, -0.2, 0.1, 0.9, 0.0, 0.6], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], False),
    ],
)
@torch.no_grad()
def test_a_model_meeting_the_bound_routes_as_without_candidates(library, logits, exact):
    logits = torch.tensor(logits)
    glider, (ids, dec) = glider_model(library), token_inputs(rows=3)
    config = glider.config
    max_d_in = max(config.d_model, config.d_ff, config.num_heads * config.d_kv)
    certified = candidates_are_exact(logits, 2, 3, max_d_in)
    assert certified.all() if exact else not certified[[0, 1]].any()
    expected = glider(input_ids=ids, decoder_input_ids=dec, global_routing_logits=logits, output_routing=True)
    config.router_candidates = 3
    got = glider(input_ids=ids, decoder_input_ids=dec, global_routing_logits=logits, output_routing=True)
    used = [torch.stack(list(o.routing.module_usage(6, 3).values())) for o in (got, expected)]
    if exact:
        torch.testing.assert_close(
            got.logits, expected.logits, atol=1e-4 * expected.logits.abs().max().item(), rtol=1e-4
        )
        torch.testing.assert_close(used[0], used[1], atol=1e-4, rtol=1e-4)
    else:
        assert (used[0][:, :2] - used[1][:, :2]).abs().max() > 0.1


@torch.no_grad()
def test_routing_work_with_candidates_does_not_grow_with_the_library():
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_linear import routed_linear

    flops = {}
    for num_experts in (8, 166):
        linear = routed_linear(64, num_experts, torch.float32)
        x = torch.randn(3, 2, 64)
        global_logits = torch.randn(3, num_experts)
        for m in (None, 4):
            linear.config.router_candidates = m
            with FlopCounterMode(display=False) as counter:
                linear.route(x, global_logits)
            flops[num_experts, m] = counter.get_total_flops()
    assert flops[8, 4] == flops[166, 4] > 0
    assert flops[166, None] > 10 * flops[8, None] > 0
