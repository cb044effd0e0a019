"""Ready for accelerators: a decoding step of GliderT5 compiles as one graph (`fullgraph=True`) with a static cache.

Dynamo breaks the graph at anything that waits for the device (`.item()`, `.tolist()`, `nonzero`, shapes that depend
on the data): with `fullgraph=True` such a break is an error, so these tests fail if the decode path ever synchronises
with the host. The `eager` backend traces without generating code (seconds, not minutes, on a CPU); the compiled
step must still give the logits of the uncompiled one.
"""

import pytest
import torch
from transformers.cache_utils import EncoderDecoderCache, StaticCache

from modeling_glider import GliderLinear, GliderT5ForConditionalGeneration
from tests.conftest import EMBED_DIM, make_base, make_expert


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    base = make_base(seed=3)
    dirs = [make_expert(root, base, f"t{i}", r=4, seed=i, embedding=torch.eye(4, EMBED_DIM)[i]) for i in range(4)]
    return GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2).eval()


@pytest.mark.parametrize(
    "implementation, router_candidates",
    [("auto", None), ("dense", None), ("gather", None), ("dense", 2), ("gather", 2)],
)
@torch.no_grad()
def test_decode_step_compiles_as_one_graph_with_a_static_cache(model, implementation, router_candidates):
    model.config.router_candidates = router_candidates
    ids = torch.randint(2, 60, (3, 6), generator=torch.Generator().manual_seed(0))
    logits = model.global_routing_logits(torch.randn(3, EMBED_DIM, generator=torch.Generator().manual_seed(1)), 3)
    candidates = model.routing_candidates(logits)  # once per call, as `generate` does: it waits for the device
    encoder_outputs = model.encoder(input_ids=ids, global_routing_logits=logits, routing_candidates=candidates)

    def cache():
        self_attention = StaticCache(config=model.config, max_cache_len=8)
        return EncoderDecoderCache(self_attention, StaticCache(config=model.config, max_cache_len=ids.shape[1]))

    def step(decoder_input_ids, cache, position):
        return model(
            encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input_ids, cache=cache, use_cache=True,
            global_routing_logits=logits, routing_candidates=candidates, cache_position=position,
        ).logits  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    model.config.lora_implementation = implementation
    try:
        plain_cache, compiled_cache = cache(), cache()
        tokens = torch.zeros(3, 1, dtype=torch.long)
        for position in range(4):
            expected = step(tokens, plain_cache, torch.tensor([position]))
            got = compiled(tokens, compiled_cache, torch.tensor([position]))
            torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
            tokens = expected[:, -1:].argmax(-1)
    finally:
        model.config.lora_implementation = "auto"
        model.config.router_candidates = None
        torch._dynamo.reset()


@pytest.mark.parametrize("router_candidates", [None, 2])
@torch.no_grad()
def test_a_routed_linear_at_decode_shapes_never_waits_for_the_device(model, router_candidates):
    linear = next(m for m in model.modules() if isinstance(m, GliderLinear) and m.num_experts)
    global_logits = torch.randn(8, 4)
    model.config.router_candidates = router_candidates
    try:
        for rows in (1, 8):  # from 8 rows the eager CPU path looks for shared experts; compiled, it must not
            x = torch.randn(rows, 1, linear.in_features)
            candidates = model.routing_candidates(global_logits[:rows])
            torch._dynamo.reset()
            compiled = torch.compile(linear, fullgraph=True, backend="eager")
            expected = linear(x, global_logits[:rows], routing_candidates=candidates)
            got = compiled(x, global_logits[:rows], routing_candidates=candidates)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    finally:
        model.config.router_candidates = None
        torch._dynamo.reset()
