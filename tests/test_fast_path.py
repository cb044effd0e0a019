"""The fast routed-LoRA paths ("gather", "grouped", and "auto" choosing between them) against the readable dense
reference path and the naive per-token loop of test_routing_math, in fp32, bf16 and fp16; plus loading with an
accelerate device map.

Tolerances: fp32 paths differ only in summation order: 1e-5 (absolute and relative) on one linear's outputs of size
~1, 1e-4 on the logits of a whole model, 1e-4 of the largest gradient on gradients summed over many tokens. bf16 and
fp16 models are compared with the same model in fp32: largest logit error below 5e-2 (bf16) or 1e-2 (fp16) of the
largest logit.
"""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configuration_glider import GliderConfig
from modeling_glider import GliderT5ForConditionalGeneration, fast_lora, routing
from modeling_glider.fast_lora import (
    gathered_mixture_of_lora,
    grouped_mixture_of_lora,
    grouped_mm_applies,
    mixture_costs,
)
from modeling_glider.routing import GliderLinear, route_siblings
from tests.conftest import EMBED_DIM, assert_decisive, make_base, make_expert
from tests.hostile.test_expert_inputs import tree_hashes
from tests.test_routing_math import heterogeneous_library, naive_model  # noqa: F401 (a fixture)

D_IN, D_OUT = 32, 48
PATH = "encoder.block.0.layer.0.SelfAttention.q"
FAST = ("gather", "grouped")
real_grouped_mm = torch._grouped_mm
LONG = 64  # inputs of more tokens than this are "long": the encoder's calls route hundreds of (token, expert) pairs


def linear_config(top_k: int, top_p=None, **overrides) -> GliderConfig:
    """Four experts with different ranks, alphas and rslora at PATH (ranks padded to 5); a fifth adapts only `k`."""
    experts = [
        {"name": "a", "target_modules": ["q", "k"], "r": 2, "lora_alpha": 4},
        {"name": "b", "target_modules": ["q"], "r": 5, "lora_alpha": 8, "use_rslora": True},
        {"name": "c", "target_modules": ["q"], "r": 3, "lora_alpha": 3},
        {"name": "d", "target_modules": ["q", "v"], "r": 4, "lora_alpha": 16, "rank_pattern": {"q": 1}},
        {"name": "only_k", "target_modules": ["k"], "r": 2, "lora_alpha": 2},
    ]
    return GliderConfig(experts=experts, router_top_k=top_k, router_top_p=top_p, **overrides)


def random_linear(config: GliderConfig, path: str = PATH, seed: int = 0, dtype=torch.float32) -> GliderLinear:
    linear = GliderLinear(config, path, D_IN, D_OUT)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in linear.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
        for e, rank in enumerate(linear.expert_ranks):  # the padding rows stay zero, as in a built model
            linear.lora_A[e, rank:] = 0
            linear.lora_B[e, :, rank:] = 0
    return linear.to(dtype)


def run(linear: GliderLinear, implementation: str, *args, **kwargs) -> torch.Tensor:
    linear.config.lora_implementation = implementation
    try:
        return linear(*args, **kwargs)
    finally:
        linear.config.lora_implementation = "auto"


@pytest.mark.parametrize("top_k, top_p", [(1, None), (2, None), (3, None), (4, 0.5), (2, 0.9)])
@pytest.mark.parametrize("use_global", [False, True])
@pytest.mark.parametrize("tokens", [3, 150])
def test_fast_linear_equals_dense_reference(top_k, top_p, use_global, tokens):
    linear = random_linear(linear_config(top_k, top_p))
    x = torch.randn(2, tokens, D_IN, generator=torch.Generator().manual_seed(1))
    global_logits = 3 * torch.randn(2, 5, generator=torch.Generator().manual_seed(2)) if use_global else None
    with torch.no_grad():
        expected = run(linear, "dense", x, global_logits)
        weights, indices = linear.route(x, global_logits)
        # the formula as written: softmax over every expert, top-k, top-p mass (the best kept), renormalise
        probs = linear.routing_logits(x, global_logits).softmax(dim=-1)
        expected_weights, expected_indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        if top_p is not None:
            expected_weights = expected_weights * ((expected_weights.cumsum(-1) - expected_weights) < top_p)
        expected_weights = expected_weights / expected_weights.sum(dim=-1, keepdim=True)
        assert (indices == expected_indices).all()
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-6)
        for implementation in FAST + ("auto",):
            torch.testing.assert_close(run(linear, implementation, x, global_logits), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, torch.nn.functional.linear(x, linear.weight), atol=1e-2)  # LoRA matters


@pytest.mark.parametrize("rows_share_experts", [False, True])
def test_gather_reads_shared_experts_once_with_the_same_result(rows_share_experts):
    """The gather path reads each expert once when rows share experts (beams of one query) and gathers per token
    otherwise; both equal the dense reference."""
    linear = random_linear(linear_config(top_k=2))
    if rows_share_experts:  # 8 rows, 2 experts in use: 2 * 2 <= 16 pairs
        indices = torch.tensor([[0, 1], [1, 0]]).repeat(4, 1)[:, None, :]
    else:  # 2 rows, 4 experts in use
        indices = torch.tensor([[0, 1], [2, 3]])[:, None, :]
    x = torch.randn(indices.shape[0], 1, D_IN)
    weights = torch.rand(indices.shape).softmax(dim=-1)
    with torch.no_grad():
        expected = linear.mixture_of_lora(x, weights, indices)
        scaled = weights * linear.lora_scaling[indices]
        got = gathered_mixture_of_lora(torch.zeros_like(expected), x, scaled, indices, linear.lora_A, linear.lora_B)
        # one scaling for all experts, applied where the mixture is added
        halved = gathered_mixture_of_lora(
            torch.zeros_like(expected), x, scaled, indices, linear.lora_A, linear.lora_B, scaling=0.5
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(halved, expected / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows_share_experts", [False, True])
def test_gather_copies_in_chunks_within_its_memory_bound(rows_share_experts, monkeypatch):
    """With the copies' bound at a few (token, expert) pairs, the gather path takes 23 tokens in chunks of at most that
    many copies (the last one partial) and never reads shared experts once through a larger intermediate; the result
    equals w s B A x summed per token in a Python loop."""
    tokens, k, rank, num_experts = 23, 2, 4, 6
    pair_bytes = rank * (D_IN + D_OUT) * 4
    monkeypatch.setattr(fast_lora, "GATHER_COPY_BYTES", 3 * k * pair_bytes)  # 3 tokens' copies
    chunks = []
    real_gathered_rows = fast_lora.gathered_rows
    monkeypatch.setattr(fast_lora, "gathered_rows", lambda x, *a: chunks.append(len(x)) or real_gathered_rows(x, *a))
    generator = torch.Generator().manual_seed(4)
    A = torch.randn(num_experts, rank, D_IN, generator=generator)
    B = torch.randn(num_experts, D_OUT, rank, generator=generator)
    x = torch.randn(tokens, 1, D_IN, generator=generator)
    if rows_share_experts:  # 2 experts for 46 pairs: read once, were its intermediate within the bound
        indices = torch.randint(0, 2, (tokens, 1, k), generator=generator)
    else:
        indices = torch.randint(0, num_experts, (tokens, 1, k), generator=generator)
    weights = torch.rand(indices.shape, generator=generator)
    y = torch.randn(tokens, 1, D_OUT, generator=generator)
    expected = y.clone()
    for t, slot in itertools.product(range(tokens), range(k)):
        e = indices[t, 0, slot]
        expected[t, 0] += 0.5 * weights[t, 0, slot] * (B[e] @ (A[e] @ x[t, 0]))
    got = gathered_mixture_of_lora(y.clone(), x, weights, indices, A, B, scaling=0.5)
    assert chunks == [3] * 7 + [2]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "rank, grad, num_experts, used", [(8, False, 6, 5), (5, False, 6, 5), (8, True, 6, 5), (8, False, 64, 3)]
)
def test_grouped_matmuls_and_loop_equal_a_naive_per_token_loop(rank, grad, num_experts, used, monkeypatch):
    """The grouped path as two grouped matmuls (fp32, 16-byte strides, no autograd, enough of the experts in use) and
    as its loop over experts (rank 5 breaks the strides; autograd; 3 of 64 experts in use) both equal w s B A x summed
    per token in a Python loop; unused and repeated experts included."""
    tokens, k = 40, 3
    generator = torch.Generator().manual_seed(3)
    A = torch.randn(num_experts, rank, D_IN, generator=generator).requires_grad_(grad)
    B = torch.randn(num_experts, D_OUT, rank, generator=generator)
    x = torch.randn(2, tokens // 2, D_IN, generator=generator)
    indices = torch.randint(0, used, (2, tokens // 2, k), generator=generator)  # the experts above `used` unused
    grouped_mm_calls = []
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: grouped_mm_calls.append(1) or real_grouped_mm(*a, **kw))
    weights = torch.rand(indices.shape, generator=generator)
    y = torch.randn(2, tokens // 2, D_OUT, generator=generator)
    expected = y.clone()
    for b, t in torch.cartesian_prod(torch.arange(2), torch.arange(tokens // 2)).tolist():
        for slot in range(k):
            e = indices[b, t, slot]
            expected[b, t] += 0.25 * weights[b, t, slot] * (B[e] @ (A[e] @ x[b, t]))
    with torch.set_grad_enabled(grad):
        assert grouped_mm_applies(x, A, B) == (rank % 4 == 0 and not grad)
        got = grouped_mixture_of_lora(y.clone(), x, weights, indices, A, B, scaling=0.25)
    assert bool(grouped_mm_calls) == (rank % 4 == 0 and not grad and num_experts < 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stack_gates", [True, False])
@pytest.mark.parametrize("local_router", ["phatgoose", "arrow"])
@pytest.mark.parametrize("top_p, use_global", [(None, True), (0.6, True), (None, False)])
def test_siblings_route_together_as_each_alone(local_router, top_p, use_global, stack_gates, monkeypatch):
    """q, k and v routed together (one LayerNorm, one logits matmul or one per linear, one top-k) give each linear its
    own routing; linears adapted by different experts, or narrowed to candidates, route alone (None)."""
    # the cost of an operator decides whether the gates are stacked for one matmul: none, or too much to pay
    monkeypatch.setitem(routing.OPERATOR_BYTES, "cpu", 10**12 if stack_gates else 0)
    experts = [{"name": f"e{i}", "target_modules": ["q", "k", "v"], "r": 4, "lora_alpha": 4} for i in range(5)]
    config = GliderConfig(experts=experts, router_top_k=2, router_top_p=top_p, local_router=local_router)
    prefix = "encoder.block.0.layer.0.SelfAttention"
    siblings = tuple(random_linear(config, f"{prefix}.{name}", seed=i) for i, name in enumerate("qkv"))
    x = torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(4))
    global_logits = 2 * torch.randn(3, 5, generator=torch.Generator().manual_seed(5)) if use_global else None
    with torch.no_grad():
        for tokens in (7, 0):  # an empty input too
            together = route_siblings(siblings, x[:, :tokens], global_logits)
            for linear, (weights, indices) in zip(siblings, together):
                expected_weights, expected_indices = linear.route(x[:, :tokens], global_logits)
                assert torch.equal(indices, expected_indices)
                torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"SelfAttention.k: sibling_routing .* not the routing of inputs \(3, 6, 32\)"):
        siblings[1](x[:, :6], sibling_routing=together[1])  # the routing of another input
    partial = random_linear(linear_config(top_k=2))  # experts a-d at q; a and only_k at k
    assert route_siblings((partial, random_linear(linear_config(top_k=2), f"{prefix}.k")), x) == (None, None)
    config.router_candidates = 3
    if use_global:
        assert route_siblings(siblings, x, global_logits) == (None, None, None)


def test_linear_with_fewer_experts_than_top_k_and_partial_library():
    config = linear_config(top_k=3)
    k_linear = random_linear(config, "encoder.block.0.layer.0.SelfAttention.k")  # experts a and only_k: 2 < 3
    v_linear = random_linear(config, "encoder.block.0.layer.0.SelfAttention.v")  # expert d only
    assert k_linear.expert_ids == [0, 4] and not k_linear.routes_all_experts and v_linear.expert_ids == [3]
    x = torch.randn(3, 70, D_IN)
    global_logits = torch.randn(3, 5) * 4
    with torch.no_grad():
        for linear in (k_linear, v_linear):
            expected = run(linear, "dense", x, global_logits)
            for implementation in FAST:
                torch.testing.assert_close(run(linear, implementation, x, global_logits), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", FAST)
def test_fast_paths_have_the_reference_gradients(implementation):
    """Training through the fast paths (e.g. the gates) gives the dense path's gradients."""
    linear = random_linear(linear_config(top_k=2))
    x = torch.randn(2, 80, D_IN, requires_grad=True)
    global_logits = torch.randn(2, 5)
    grads = {}
    for name in ("dense", implementation):
        linear.zero_grad()
        x.grad = None
        run(linear, name, x, global_logits).square().sum().backward()
        grads[name] = [t.grad.clone() for t in (x, linear.lora_A, linear.lora_B, linear.router_gate)]
    for got, expected in zip(grads[implementation], grads["dense"]):
        scale = expected.abs().max()
        assert scale > 0 and (got - expected).abs().max() < 1e-4 * scale  # sums over 160 tokens in fp32


def test_changed_gates_are_used_at_once():
    """The fast path reuses the normalised gates; any change of the gates must reach the next call."""
    linear = random_linear(linear_config(top_k=2)).requires_grad_(False)
    x = torch.randn(1, 5, D_IN)
    with torch.no_grad():
        before = run(linear, "gather", x)
        linear.router_gate.mul_(-1)  # in place: reverses every expert's preference
        torch.testing.assert_close(run(linear, "gather", x), run(linear, "dense", x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(run(linear, "gather", x), before, atol=1e-2)
        linear.load_state_dict({**linear.state_dict(), "router_gate": torch.randn(4, D_IN)})
        torch.testing.assert_close(run(linear, "gather", x), run(linear, "dense", x), atol=1e-5, rtol=1e-5)
        with torch.inference_mode():
            torch.testing.assert_close(run(linear, "gather", x), run(linear, "dense", x), atol=1e-5, rtol=1e-5)
        linear.double()
        torch.testing.assert_close(
            run(linear, "gather", x.double()), run(linear, "dense", x.double()), atol=1e-5, rtol=1e-5
        )


def test_config_names_the_implementation():
    assert GliderConfig().lora_implementation == "auto"
    with pytest.raises(ValueError, match="lora_implementation.*'fastest'"):
        GliderConfig(lora_implementation="fastest")
    linear = random_linear(linear_config(top_k=2))
    one_token = torch.randn(1, 1, D_IN)
    assert linear.lora_implementation(one_token) == "gather"  # copying 2 experts' tensors beats any grouping
    assert linear.lora_implementation(torch.randn(1, 4096, D_IN)) == "grouped"  # 8192 copies against 4 experts
    linear.config.lora_implementation = "dense"
    assert linear.lora_implementation(one_token) == "dense"


@pytest.mark.parametrize("device_type, grouped_mm", [("cpu", True), ("cpu", False), ("cuda", False)])
def test_auto_cost_model_gathers_small_decoding_steps_and_groups_long_inputs(device_type, grouped_mm):
    """For every shape of the benchmarks: a decoding step of up to 8 rows at d_model 256 with 36 or more experts gathers
    (reading every expert would cost more than copying 16); on CPU, 2^15 tokens group (copies grow with every token,
    the experts in use stop at E), and at d_model <= 768 16 beams (4 queries x 4) that use 8 of 36 or more experts
    gather, each expert read once; on an accelerator the model's gather cost grows in proportion to the tokens."""
    for d_model, num_experts, element_size in itertools.product((256, 768, 2048), (8, 36, 166), (2, 4)):
        shape = {"k": 2, "num_experts": num_experts, "rank": 16, "d_in": d_model, "d_out": d_model}
        shape |= {"element_size": element_size, "device_type": device_type, "grouped_mm": grouped_mm}
        costs = [mixture_costs(tokens, **shape) for tokens in (2 ** torch.arange(16)).tolist()]
        choices = [min(cost, key=cost.get) for cost in costs]
        if d_model == 256 and num_experts >= 36:
            assert choices[:4] == ["gather"] * 4, (shape, choices)
        if device_type == "cpu":
            assert choices[-1] == "grouped", (shape, choices)
            beams = mixture_costs(16, **shape, used=8)
            if d_model <= 768 and num_experts >= 36:
                assert min(beams, key=beams.get) == "gather", (shape, beams)
        else:
            gather = torch.tensor([cost["gather"] for cost in costs], dtype=torch.float64)
            assert (gather[1:] > gather[:-1]).all()
            # long inputs: the copies' bytes and one chunk's operators per GATHER_COPY_BYTES copied, both per token
            torch.testing.assert_close(gather[-1] / 2, gather[-2], rtol=0.05, atol=0)


@pytest.fixture
def glider_library(tmp_path):
    base = make_base(seed=3)
    embeddings = torch.randn(4, EMBED_DIM, generator=torch.Generator().manual_seed(4))
    dirs = [
        make_expert(tmp_path, base, "e0", r=4, seed=20, embedding=embeddings[0]),
        make_expert(tmp_path, base, "e1", r=8, lora_alpha=4, seed=21, embedding=embeddings[1]),
        make_expert(tmp_path, base, "e2", r=2, targets=("q", "v", "wo"), seed=22, embedding=embeddings[2]),
        make_expert(tmp_path, base, "e3", r=4, layers=[1], seed=23, embedding=embeddings[3]),
    ]
    return base, dirs


def test_implementation_chosen_at_load_reaches_every_linear(glider_library, tmp_path):
    base, dirs = glider_library
    GliderT5ForConditionalGeneration.from_experts(base, dirs, lora_implementation="grouped").save_pretrained(tmp_path)
    assert GliderT5ForConditionalGeneration.from_pretrained(tmp_path).config.lora_implementation == "grouped"
    model = GliderT5ForConditionalGeneration.from_pretrained(tmp_path, lora_implementation="dense")
    linears = [m for m in model.modules() if isinstance(m, GliderLinear)]
    assert linears and {m.lora_implementation(1) for m in linears} == {"dense"}


def with_implementation(model: GliderT5ForConditionalGeneration, implementation: str):
    model.config.lora_implementation = implementation  # every linear shares the model's config
    return model


@pytest.mark.parametrize("top_p", [None, 0.7])
def test_model_fast_paths_equal_dense(glider_library, top_p):
    base, dirs = glider_library
    glider = GliderT5ForConditionalGeneration.from_experts(
        base, dirs, top_k=2, global_routing_scale=3.0, router_top_p=top_p
    )
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 64, (2, LONG + 20), generator=generator)  # the encoder groups
    dec = torch.randint(2, 64, (2, 4), generator=generator)  # the decoder gathers
    u = torch.randn(2, EMBED_DIM, generator=generator)
    with torch.no_grad():
        expected = with_implementation(glider, "dense")(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u)
        for implementation in ("auto", *FAST):
            got = with_implementation(glider, implementation)(
                input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u
            )
            torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_fast_equals_dense(glider_library, num_beams):
    base, dirs = glider_library
    glider = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=3.0)
    ids = torch.randint(2, 64, (3, 70), generator=torch.Generator().manual_seed(8))
    u = torch.randn(3, EMBED_DIM, generator=torch.Generator().manual_seed(7))
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "num_beams": num_beams, "do_sample": False}
    outputs = {
        implementation: with_implementation(glider, implementation).generate(
            input_ids=ids, instruction_embeddings=u, output_scores=True, return_dict_in_generate=True, **kwargs
        )
        for implementation in ("dense", "auto")
    }
    assert_decisive(outputs["dense"], num_beams)  # the paths sum in other orders: no choice may hang on rounding
    assert torch.equal(outputs["auto"].sequences, outputs["dense"].sequences)


def test_grouped_path_equals_naive_per_token_loop(heterogeneous_library):  # noqa: F811 (fixture)
    """Long inputs (grouped encoder), top-k 3 with the global term, heterogeneous ranks: the float64 naive loop."""
    base, dirs = heterogeneous_library
    alpha = 2.0
    glider = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=3, global_routing_scale=alpha)
    naive, query = naive_model(base, dirs, alpha, 3, None)
    ids = torch.randint(2, 64, (1, LONG + 6), generator=torch.Generator().manual_seed(8))
    dec = torch.randint(2, 64, (1, 3), generator=torch.Generator().manual_seed(9))
    u = torch.randn(1, EMBED_DIM, generator=torch.Generator().manual_seed(10))
    query["u"] = u.double()
    glider.config.lora_implementation = "grouped"
    with torch.no_grad():
        expected = naive(input_ids=ids, decoder_input_ids=dec).logits
        got = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)  # fp32 routing in a float64 model


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_half_precision_models_match_fp32(tmp_path, dtype, tolerance):
    """bf16/fp16 GliderT5s run every path, route in fp32, and stay close to the fp32 model.

    Routing is discrete: a token whose two best experts nearly tie may switch experts under any rounding. The queries
    here sit between experts e0 and e1 and far from e2, so every token uses e0 and e1 in every dtype, with weights set
    by the local routers.
    """
    base32 = make_base(seed=11)
    embeddings = torch.eye(3, EMBED_DIM)
    dirs = [make_expert(tmp_path, base32, f"e{i}", seed=30 + i, embedding=embeddings[i]) for i in range(3)]
    glider32 = GliderT5ForConditionalGeneration.from_experts(base32, dirs, top_k=2, global_routing_scale=50.0)
    glider16 = GliderT5ForConditionalGeneration.from_experts(base32.to(dtype), dirs, top_k=2, global_routing_scale=50.0)
    with torch.no_grad():  # experts of a realistic size: with make_expert's, this toy T5's attention is ill-conditioned
        for module in [*glider32.modules(), *glider16.modules()]:
            if isinstance(module, GliderLinear) and module.num_experts:
                module.lora_B.mul_(0.1)
    assert glider16.get_submodule("encoder.block.0.layer.0.SelfAttention.q").lora_A.dtype == dtype
    ids = torch.randint(2, 64, (2, LONG + 8), generator=torch.Generator().manual_seed(12))
    dec = torch.randint(2, 64, (2, 4), generator=torch.Generator().manual_seed(13))
    u = embeddings[0] + embeddings[1] + torch.tensor([[0.0], [0.1]])
    with torch.no_grad():
        reference = glider32(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
        scale = reference.abs().max()
        assert (reference - base32.float()(input_ids=ids, decoder_input_ids=dec).logits).abs().max() > 0.1 * scale
        for implementation in ("auto", "gather", "grouped", "dense"):
            out = with_implementation(glider16, implementation)(
                input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u, output_routing=True
            )
            assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
            assert (out.logits.float() - reference).abs().max() / scale < tolerance, implementation
            for calls in out.routing.calls.values():
                weights, experts, _ = calls[0]
                assert weights.dtype == torch.float32  # routing stays fp32
                assert set(experts.unique().tolist()) <= {0, 1} and weights.min(dim=-1).values.mean() > 0.1


def blocks_split(device_map: dict) -> list[str]:
    """Entries of a device map below a T5 block (`encoder.block.0.layer.1...`): parts of a block put apart."""
    return [name for name in device_map if ".block." in name and name.split(".block.")[1].count(".")]


def assert_same_answers(model, plain, ids, u):
    """Logits within fp32 rounding of the plain model's (the same weights, computed where accelerate put them), and
    the same greedy and beam-search answers, each choice far from a tie."""
    with torch.no_grad():
        expected = plain(input_ids=ids, decoder_input_ids=ids[:, :5], instruction_embeddings=u).logits
        got = model(input_ids=ids, decoder_input_ids=ids[:, :5], instruction_embeddings=u).logits
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    for num_beams in (1, 2):
        kwargs = {"max_new_tokens": 4, "num_beams": num_beams, "instruction_embeddings": u}
        reference = plain.generate(input_ids=ids, output_scores=True, return_dict_in_generate=True, **kwargs)
        assert_decisive(reference, num_beams=num_beams)
        assert torch.equal(model.generate(input_ids=ids, **kwargs), reference.sequences)


def test_device_map_keeps_blocks_whole_and_outputs_equal(glider_library, tmp_path):
    from accelerate import infer_auto_device_map

    base, dirs = glider_library
    GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2).save_pretrained(tmp_path / "saved")
    plain = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    offloaded = GliderT5ForConditionalGeneration.from_pretrained(  # about half on "cpu", the rest offloaded to disk
        tmp_path / "saved", device_map="auto", max_memory={"cpu": size // 2}, offload_folder=str(tmp_path / "offload")
    )
    device_map = offloaded.hf_device_map
    assert {"cpu", "disk"} <= set(device_map.values())
    assert not blocks_split(device_map)
    # without `_no_split_modules` the same memory would cut blocks apart: the check above can fail
    assert blocks_split(infer_auto_device_map(plain, max_memory={"cpu": size // 2, "disk": size}))
    ids = torch.randint(2, 64, (2, LONG + 4), generator=torch.Generator().manual_seed(15))
    u = torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(16))
    assert_same_answers(offloaded, plain, ids, u)


def test_explicit_device_map_puts_encoder_and_decoder_blocks_on_cpu_and_disk(glider_library, tmp_path):
    base, dirs = glider_library
    GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2).save_pretrained(tmp_path / "saved")
    plain = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    # the tied embeddings and lm_head stay together (accelerate cannot offload one of tied weights alone, as for T5)
    device_map = {"shared": "cpu", "encoder.embed_tokens": "cpu", "decoder.embed_tokens": "cpu", "lm_head": "cpu"}
    device_map |= {"encoder.block.0": "cpu", "encoder.block.1": "disk", "encoder.final_layer_norm": "disk"}
    device_map |= {"decoder.block.0": "disk", "decoder.block.1": "cpu", "decoder.final_layer_norm": "cpu"}
    device_map |= {"global_router": "disk"}  # it holds a buffer only: buffers stay in memory (offload_buffers=False)
    before = tree_hashes(tmp_path / "saved")
    model = GliderT5ForConditionalGeneration.from_pretrained(
        tmp_path / "saved", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert model.hf_device_map == device_map
    on_disk = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    for prefix in ("encoder.block.1.", "decoder.block.0."):  # whole blocks, experts included, are offloaded
        assert (
            f"{prefix}layer.0.SelfAttention.q.lora_A" in on_disk
            and f"{prefix}layer.0.SelfAttention.q.weight" in on_disk
        )
    assert not [name for name in on_disk if name.startswith(("encoder.block.0.", "decoder.block.1.", "shared"))]
    assert not any((tmp_path / "offload").iterdir())  # offloaded weights are read from the saved safetensors files
    assert model.global_router.expert_embeddings.device.type == "cpu"
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(15))
    u = torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(16))
    assert_same_answers(model, plain, ids, u)
    assert tree_hashes(tmp_path / "saved") == before


def test_saved_folder_runs_every_implementation_without_the_package(glider_library, tmp_path):
    base, dirs = glider_library
    glider = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2)
    glider.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "fast_lora.py").is_file()
    script = f"""
import sys, torch
assert not any(p.endswith("issue7") or "glider" in p for p in sys.path[1:]), sys.path
from transformers import AutoModelForSeq2SeqLM
model = AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path / "saved")!r}, trust_remote_code=True)
ids = torch.randint(2, 64, (1, 80), generator=torch.Generator().manual_seed(0))
out = {{}}
for implementation in ("dense", "auto"):
    model.config.lora_implementation = implementation
    for module in model.modules():
        if hasattr(module, "lora_implementation"):
            module.config.lora_implementation = implementation
    with torch.no_grad():
        out[implementation] = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
assert type(model).__module__ != "modeling_glider.modeling_glider", type(model).__module__  # the saved copy
difference = (out["auto"] - out["dense"]).abs().max()
assert difference < 1e-4, difference
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_readme_snippet_for_a_library_larger_than_one_device_runs(glider_library, tmp_path, monkeypatch):
    """The README's device-map snippet, run as written on a tiny model, with only `max_memory` set to this machine:
    half the model's bytes in CPU memory, the rest offloaded to disk."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Serving a library larger than one device", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    documented = 'max_memory={0: "60GiB", "cpu": "100GiB"}'
    assert documented in snippet and 'device_map="auto"' in snippet and "offload_folder=" in snippet
    base, dirs = glider_library
    GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2).save_pretrained(tmp_path / "glider-t5")
    plain = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "glider-t5")
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    monkeypatch.chdir(tmp_path)
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(15))
    u = torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(16))
    namespace = {"ids": ids, "u": u}
    exec(snippet.replace(documented, f'max_memory={{"cpu": {size // 2}}}'), namespace)
    model = namespace["model"]
    assert {"cpu", "disk"} <= set(model.hf_device_map.values()) and not blocks_split(model.hf_device_map)
    reference = plain.generate(input_ids=ids, instruction_embeddings=u, max_new_tokens=8, output_scores=True,
                               return_dict_in_generate=True)  # fmt: skip
    assert_decisive(reference)
    assert torch.equal(namespace["answers"], reference.sequences)
    assert_same_answers(model, plain, ids, u)
