"""Routing invariants as properties (hypothesis), on tiny GliderT5s built through the public API.

Tolerances. Whole-model logits of computations batched, padded or ordered differently (experts summed in another
order, another LoRA path) differ by up to ~1e-5 of the largest logit on these models (measured); the tests allow
1e-4 of it, `atol = 1e-4 * max(1, |reference|.max())`. Routing weights are fp32 softmaxes of values of size ~10:
1e-5. Routing is discrete: a token whose k-th and (k+1)-th experts nearly tie may switch experts under any
rounding, so examples whose reference run has such a near tie (below 1e-4) are discarded (`assume`), not compared.
Hypothesis runs derandomized: the same examples on every run and machine.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.routing import GliderLinear, glider_routing_weights
from tests.conftest import EMBED_DIM, make_base, make_expert

PROPERTY = settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
NUM_EXPERTS = 4
IMPLEMENTATIONS = ("dense", "gather", "grouped")
# Four experts of different ranks, alphas and module sets (partial libraries exercise the global logits' selection).
EXPERTS = [
    dict(r=2, lora_alpha=4),
    dict(r=4, lora_alpha=8, targets=("q", "v", "wo")),
    dict(r=3, lora_alpha=3, use_rslora=True),
    dict(r=2, lora_alpha=2, targets=("k", "o", "wi_0", "wi_1")),
]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("properties")
    base = make_base(seed=2)
    embeddings = torch.randn(NUM_EXPERTS, EMBED_DIM, generator=torch.Generator().manual_seed(3))
    dirs = [
        make_expert(root, base, f"e{i}", seed=40 + i, embedding=embeddings[i], **spec) for i, spec in enumerate(EXPERTS)
    ]
    zero_dirs = [
        make_expert(root / "zero", base, f"z{i}", seed=50 + i, zero_B=True, embedding=embeddings[i], **spec)
        for i, spec in enumerate(EXPERTS)
    ]
    return base, dirs, zero_dirs


@pytest.fixture(scope="module")
def build(library):
    """A GliderT5 over the library's experts in the given order (built once per order)."""
    base, dirs, _ = library
    models = {}

    def build(order=tuple(range(NUM_EXPERTS))):
        if order not in models:
            models[order] = GliderT5ForConditionalGeneration.from_experts(
                base, [dirs[i] for i in order], top_k=2, global_routing_scale=3.0
            ).eval()
        return models[order]

    return build


@pytest.fixture(scope="module")
def zero_B_model(library):
    base, _, zero_dirs = library
    return GliderT5ForConditionalGeneration.from_experts(base, zero_dirs, top_k=2, global_routing_scale=3.0).eval()


def queries(seed: int, lengths: list[int], decoder_length: int = 3):
    """Token ids of queries of the given lengths, their decoder inputs, and one instruction embedding each."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(2, 64, (n,), generator=g) for n in lengths]
    dec = torch.randint(2, 64, (len(lengths), decoder_length), generator=g)
    return rows, dec, torch.randn(len(lengths), EMBED_DIM, generator=g)


def pad(rows):
    ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def tolerance(reference: torch.Tensor) -> float:
    return 1e-4 * max(1.0, float(reference.abs().max()))


def configured(model, top_k: int, implementation: str = "dense"):
    """Set routing knobs on the model's config (every linear reads it), returning the previous ones."""
    previous = (model.config.router_top_k, model.config.lora_implementation)
    model.config.router_top_k, model.config.lora_implementation = top_k, implementation
    return previous


def restore(model, previous):
    model.config.router_top_k, model.config.lora_implementation = previous


class RoutingInputs:
    """Captures what every routed linear of `model` receives during a call: its input x and the global logits."""

    def __init__(self, model):
        self.model, self.seen, self.handles = model, [], []

    def __enter__(self):
        for module in self.model.modules():
            if isinstance(module, GliderLinear) and module.num_experts:
                self.handles.append(module.register_forward_pre_hook(self.hook, with_kwargs=True))
        return self

    def hook(self, module, args, kwargs):
        self.seen.append((module, args[0].detach(), kwargs.get("global_routing_logits")))

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    @torch.no_grad()
    def min_margin(self, top_k: int) -> float:
        """The smallest gap between a kept expert's routing logit and the best one left out, over every token."""
        margin = math.inf
        for module, x, global_logits in self.seen:
            logits = module.routing_logits(x, global_logits)
            k = min(top_k, logits.shape[-1])
            if k < logits.shape[-1]:
                top = logits.topk(k + 1, dim=-1).values
                margin = min(margin, float((top[..., k - 1] - top[..., k]).min()))
        return margin


def decisive_logits(model, top_k: int, **inputs) -> torch.Tensor:
    """The logits of `model(**inputs)`, after discarding the example if any token's routing is a near tie."""
    with torch.no_grad(), RoutingInputs(model) as routing:
        logits = model(**inputs).logits
    assume(routing.min_margin(top_k) > 1e-4)
    return logits


lengths = st.lists(st.integers(1, 9), min_size=2, max_size=4)
seeds = st.integers(0, 2**16)
top_ks = st.integers(1, NUM_EXPERTS)  # more than the experts is refused by the config


@PROPERTY
@given(order=st.permutations(range(NUM_EXPERTS)), seed=seeds, top_k=top_ks, use_global=st.booleans())
def test_expert_order_changes_no_output(build, order, seed, top_k, use_global):
    model, permuted = build(), build(tuple(order))
    # the global router follows the experts: its expert embeddings, and so the global logits, are permuted
    assert torch.equal(permuted.global_router.expert_embeddings, model.global_router.expert_embeddings[list(order)])
    (row,), dec, u = queries(seed, [7])
    inputs = dict(input_ids=row[None], decoder_input_ids=dec, instruction_embeddings=u[:1] if use_global else None)
    if use_global:
        torch.testing.assert_close(
            permuted.global_routing_logits(u), model.global_routing_logits(u)[:, list(order)], atol=1e-6, rtol=1e-6
        )
    previous = [configured(m, top_k) for m in (model, permuted)]
    try:
        expected = decisive_logits(model, top_k, **inputs)
        with torch.no_grad():
            got = permuted(**inputs).logits
    finally:
        restore(model, previous[0])
        restore(permuted, previous[1])
    torch.testing.assert_close(got, expected, atol=tolerance(expected), rtol=0)


@PROPERTY
@given(
    lengths=lengths,
    seed=seeds,
    top_k=top_ks,
    implementation=st.sampled_from(IMPLEMENTATIONS),
    use_global=st.booleans(),
)
def test_padding_and_batch_composition_change_no_row(build, lengths, seed, top_k, implementation, use_global):
    model = build()
    rows, dec, u = queries(seed, lengths)
    ids, mask = pad(rows)
    previous = configured(model, top_k, implementation)
    try:
        with torch.no_grad():
            batched = model(
                input_ids=ids,
                attention_mask=mask,
                decoder_input_ids=dec,
                instruction_embeddings=u if use_global else None,
            ).logits
        for i, row in enumerate(rows):
            alone = decisive_logits(
                model, top_k, input_ids=row[None], decoder_input_ids=dec[i : i + 1],
                instruction_embeddings=u[i : i + 1] if use_global else None,
            )  # fmt: skip
            torch.testing.assert_close(batched[i : i + 1], alone, atol=tolerance(alone), rtol=0)
    finally:
        restore(model, previous)


@PROPERTY
@given(seed=seeds, experts=st.integers(1, 6), top_k=st.integers(1, 7), top_p=st.none() | st.floats(0.05, 1.0))
def test_kept_weights_are_the_renormalised_top_of_the_softmax(seed, experts, top_k, top_p):
    g = torch.Generator().manual_seed(seed)
    local = 4 * torch.randn(3, 5, experts, generator=g)
    global_logits = 10 * torch.randn(3, experts, generator=g)[:, None, :]
    weights, indices = glider_routing_weights(local, global_logits, top_k, top_p)
    probs = (local.double() + global_logits.double()).softmax(dim=-1)  # independently, in float64
    k = min(top_k, experts)
    assert weights.shape == indices.shape == (3, 5, k)
    best = probs.topk(k, dim=-1).values
    # the kept experts are the k most probable (compared by probability: robust to ties between experts)
    torch.testing.assert_close(probs.gather(-1, indices), best, atol=1e-6, rtol=0)
    if top_p is not None:  # the smallest prefix whose mass reaches top_p (the best expert always)
        before = best.cumsum(dim=-1) - best
        assume(((before - top_p).abs() > 1e-5).all())  # no token on the edge of the cut
        best = best * (before < top_p)
    assert (weights >= 0).all() and ((weights > 0).sum(dim=-1) <= top_k).all()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(weights.double(), best / best.sum(dim=-1, keepdim=True), atol=1e-5, rtol=0)


@PROPERTY
@given(
    lengths=lengths,
    seed=seeds,
    top_k=top_ks,
    implementation=st.sampled_from(IMPLEMENTATIONS),
    use_global=st.booleans(),
)
def test_recorded_routing_weights_are_the_top_of_an_independent_softmax(
    build, lengths, seed, top_k, implementation, use_global
):
    """Every linear's routing (`route`, on the dense, gather and grouped paths), recorded with
    `output_routing=True`, against the GLIDER formula computed here in float64 from that linear's input."""
    model = build()
    rows, dec, u = queries(seed, lengths)
    ids, mask = pad(rows)
    G = model.global_router.expert_embeddings.double()
    global_logits = 3.0 * F.normalize(u.double(), dim=-1) @ F.normalize(G, dim=-1).T
    previous = configured(model, top_k, implementation)
    try:
        with torch.no_grad(), RoutingInputs(model) as routing:
            out = model(
                input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                instruction_embeddings=u if use_global else None, output_routing=True,
            )  # fmt: skip
    finally:
        restore(model, previous)
    calls = {path: list(records) for path, records in out.routing.calls.items()}
    assert len(routing.seen) == sum(len(records) for records in calls.values()) > 0
    for module, x, _ in routing.seen:
        weights, expert_ids, _ = calls[module.module_path].pop(0)
        gates = F.layer_norm(module.router_gate.double(), (module.in_features,), eps=1e-5)
        local = F.layer_norm(x.double(), (module.in_features,), eps=1e-5) @ gates.T / math.sqrt(module.in_features)
        experts = module.expert_ids
        logits = local + global_logits[:, None, experts] if use_global else local
        probs = logits.softmax(dim=-1)
        k = min(top_k, len(experts))
        assert weights.shape[-1] == k and (weights >= 0).all() and ((weights > 0).sum(dim=-1) <= top_k).all()
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(weights.shape[:-1]), atol=1e-5, rtol=0)
        slots = torch.tensor([experts.index(e) for e in expert_ids.flatten().tolist()]).view(expert_ids.shape)
        best = probs.topk(k, dim=-1).values
        torch.testing.assert_close(probs.gather(-1, slots), best, atol=1e-5, rtol=0)
        torch.testing.assert_close(weights.double(), best / best.sum(dim=-1, keepdim=True), atol=1e-5, rtol=0)


@PROPERTY
@given(
    lengths=lengths,
    seed=seeds,
    top_k=top_ks,
    implementation=st.sampled_from(IMPLEMENTATIONS),
    use_global=st.booleans(),
)
def test_zero_B_experts_leave_the_base_output_unchanged(
    library, zero_B_model, lengths, seed, top_k, implementation, use_global
):
    base = library[0]
    rows, dec, u = queries(seed, lengths)
    ids, mask = pad(rows)
    previous = configured(zero_B_model, top_k, implementation)
    try:
        with torch.no_grad():
            expected = base(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            got = zero_B_model(
                input_ids=ids,
                attention_mask=mask,
                decoder_input_ids=dec,
                instruction_embeddings=u if use_global else None,
            ).logits
    finally:
        restore(zero_B_model, previous)
    torch.testing.assert_close(got, expected, atol=tolerance(expected), rtol=0)


@PROPERTY
@given(seed=seeds, copies=st.integers(2, 4), top_k=top_ks, implementation=st.sampled_from(IMPLEMENTATIONS))
def test_routing_is_a_pure_function_of_the_call(build, seed, copies, top_k, implementation):
    """One query, different instruction embeddings in one batch: each row is what that embedding gives alone."""
    model = build()
    (row,), dec, _ = queries(seed, [6])
    u = torch.randn(copies, EMBED_DIM, generator=torch.Generator().manual_seed(seed + 1))
    u[0] = 0.0  # a query without instruction: local routing only
    ids, dec = row.expand(copies, -1), dec.expand(copies, -1)
    previous = configured(model, top_k, implementation)
    try:
        with torch.no_grad():
            batched = model(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
        alone = [
            decisive_logits(
                model, top_k, input_ids=ids[:1], decoder_input_ids=dec[:1], instruction_embeddings=u[i : i + 1]
            )
            for i in range(copies)
        ]
    finally:
        restore(model, previous)
    for i in range(copies):
        torch.testing.assert_close(batched[i : i + 1], alone[i], atol=tolerance(alone[i]), rtol=0)
    assert max(float((a - alone[0]).abs().max()) for a in alone[1:]) > 1e-3  # the embeddings do route differently


def test_the_properties_can_fail(build):
    """The comparisons above detect a wrong answer: a row routed with another query's embedding, a model with one
    expert's tensors swapped."""
    model = build()
    (row,), dec, u = queries(0, [6])
    with torch.no_grad():
        one = model(input_ids=row[None], decoder_input_ids=dec, instruction_embeddings=u[:1]).logits
        other = model(input_ids=row[None], decoder_input_ids=dec, instruction_embeddings=-u[:1]).logits
    assert (one - other).abs().max() > tolerance(one)
    swapped = build((1, 0, 2, 3))
    with torch.no_grad():
        linear = next(m for m in swapped.modules() if isinstance(m, GliderLinear) and m.num_experts > 1)
        saved = linear.lora_B.clone()
        linear.lora_B.copy_(saved.flip(0))
        try:
            wrong = swapped(input_ids=row[None], decoder_input_ids=dec, instruction_embeddings=u[:1]).logits
        finally:
            linear.lora_B.copy_(saved)
    assert (wrong - one).abs().max() > tolerance(one)
