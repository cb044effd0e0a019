"""Ready for accelerators: a decoding step of GliderT5 compiles as one graph (`fullgraph=True`) with a static cache.

Dynamo breaks the graph at anything that waits for the device (`.item()`, `.tolist()`, `nonzero`, shapes that depend
on the data): with `fullgraph=True` such a break is an error, so these tests fail if the decode path ever synchronises
with the host. The `eager` backend traces without generating code (seconds, not minutes, on a CPU); the compiled
step must still give the logits of the uncompiled one.
"""

import pytest
import torch
from transformers import CompileConfig
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


@pytest.mark.parametrize("router_candidates", [None, 2])
@torch.no_grad()
def test_generate_compiles_its_decoding_step_and_routes_every_call_anew(model, router_candidates):
    """Greedy `generate` with a static cache compiles its decoding step (as it does by itself on an accelerator; on a
    CPU when asked with `CompileConfig._compile_all_devices`; transformers' beam search does not compile): the tokens
    equal uncompiled generation; other tasks' instructions reuse the graph; a routing knob changed afterwards is obeyed
    (a guard recompiles), never served stale."""
    compiles = []

    def counting_backend(graph_module, example_inputs, **options):  # options: the CompileConfig mode
        compiles.append(1)
        return graph_module.forward

    compile_config = CompileConfig(fullgraph=True, backend=counting_backend)
    compile_config._compile_all_devices = True
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 60, (3, 6), generator=generator)
    experts = torch.eye(4, EMBED_DIM)  # each query between two experts' instructions: the second expert counts
    tasks = [experts[[0, 1, 2]] + experts[[1, 2, 3]], experts[[3, 3, 1]] + experts[[0, 2, 0]]]
    settings = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True}
    settings |= {"output_logits": True}
    model.config.router_candidates = router_candidates
    torch._dynamo.reset()
    try:
        step_logits = {}
        for top_k in (2, 1):
            model.config.router_top_k = top_k
            for task, instructions in enumerate(tasks):
                expected = model.generate(input_ids=ids, instruction_embeddings=instructions, **settings)
                got = model.generate(
                    input_ids=ids, instruction_embeddings=instructions, cache_implementation="static",
                    compile_config=compile_config, **settings,
                )  # fmt: skip
                assert torch.equal(got.sequences, expected.sequences), (top_k, task)
                expected_logits, got_logits = torch.stack(expected.logits), torch.stack(got.logits)
                scale = expected_logits.abs().max().item()
                torch.testing.assert_close(got_logits, expected_logits, atol=1e-5 * scale, rtol=1e-5)
                step_logits[top_k, task] = got_logits
            if top_k == 2:
                assert len(compiles) == 1  # the second batch of tasks ran the same graph
        assert len(compiles) == 2  # top_k 1: recompiled once
        for task in range(len(tasks)):  # and the knob changed what the compiled steps computed
            assert not torch.allclose(step_logits[1, task], step_logits[2, task], atol=1e-3)
    finally:
        model.config.router_top_k = 2
        model.config.router_candidates = None
        torch._dynamo.reset()
