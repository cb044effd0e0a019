"""The global router's alpha policy and per-query opt-out, against fixed-alpha models and local-only runs."""

import math

import pytest
import torch

from configuration_glider import GliderConfig
from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.hub import render_model_card
from tests.conftest import EMBED_DIM, assert_decisive, make_base, make_expert


def inputs(seed=0, batch=3, length=6, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g), torch.randint(2, vocab, (batch, 4), generator=g)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    base = make_base(seed=3, dtype=torch.float64)
    dirs = [make_expert(root, base, f"task{i}", seed=20 + i, embedding=torch.eye(EMBED_DIM)[i]) for i in range(3)]
    return base, dirs


def test_zero_row_means_no_global_term(library):
    base, dirs = library
    glider = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=50.0)
    ids, dec = inputs()
    u = torch.eye(3, EMBED_DIM) + 0.1
    u[1] = 0.0  # query 1 has no instruction
    with torch.no_grad():
        mixed = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
        local_only = glider(input_ids=ids, decoder_input_ids=dec).logits
        single = glider(input_ids=ids[1:2], decoder_input_ids=dec[1:2]).logits
        global_logits = glider.global_routing_logits(u)
    assert torch.equal(global_logits[1], torch.zeros(3))
    # the local-only computation for row 1; the other rows, routed otherwise, may group the experts' work differently
    torch.testing.assert_close(mixed[1], local_only[1], atol=1e-5 * max(1.0, local_only[1].abs().max()), rtol=0)
    torch.testing.assert_close(mixed[1:2], single, atol=1e-3, rtol=1e-3)
    assert (mixed[0] - local_only[0]).abs().max() > 0.1  # the other rows were routed globally
    with torch.no_grad():
        generated = glider.generate(input_ids=ids, instruction_embeddings=u, max_new_tokens=5, do_sample=False)
        expected = glider.generate(
            input_ids=ids[1:2], max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    assert_decisive(expected)
    assert generated[1, : expected.sequences.shape[1]].tolist() == expected.sequences[0].tolist()


def test_threshold_policy_equals_fixed_alpha_per_query(library):
    base, dirs = library
    big, small, threshold = 40.0, 2.0, 0.8
    glider = GliderT5ForConditionalGeneration.from_experts(
        base,
        dirs,
        top_k=2,
        global_routing_scale=big,
        global_routing_policy="threshold",
        global_routing_threshold=threshold,
        global_routing_scale_unmatched=small,
    )
    u = torch.zeros(3, EMBED_DIM)
    u[0, 0] = 2.0  # cos 1 with task0: matches a known expert
    u[1, :3] = 1.0  # cos 1/sqrt(3) ~ 0.58 with each: matches none
    u[2] = torch.linspace(-1, 1, EMBED_DIM)  # unrelated
    G = torch.eye(EMBED_DIM)[:3]
    cosine = [[float(u[b] @ G[e] / (u[b].norm() * G[e].norm())) for e in range(3)] for b in range(3)]
    alphas = [big if max(row) >= threshold else small for row in cosine]
    assert alphas == [big, small, small]
    expected = torch.tensor([[alphas[b] * cosine[b][e] for e in range(3)] for b in range(3)])
    torch.testing.assert_close(glider.global_routing_logits(u), expected)

    ids, dec = inputs(seed=1)
    with torch.no_grad():
        got = glider(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
        for row, alpha in enumerate(alphas):
            fixed = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=alpha)
            reference = fixed(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
            # the row is the fixed-alpha model's; other rows differ in alpha, so the experts' work may be grouped
            # differently: fp32 routing weights, 1e-5 of the logits
            torch.testing.assert_close(got[row], reference[row], atol=1e-5 * max(1.0, reference.abs().max()), rtol=0)


def test_policy_config_round_trip_and_errors(tmp_path, library):
    base, dirs = library
    glider = GliderT5ForConditionalGeneration.from_experts(
        base, dirs, global_routing_policy="threshold", global_routing_threshold=0.55, global_routing_scale_unmatched=4
    )
    glider.save_pretrained(tmp_path)
    loaded = GliderConfig.from_pretrained(tmp_path)
    assert (loaded.global_routing_policy, loaded.global_routing_threshold, loaded.global_routing_scale_unmatched) == (
        "threshold",
        0.55,
        4,
    )
    with pytest.raises(ValueError, match="global_routing_policy"):
        GliderConfig(global_routing_policy="adaptive")
    with pytest.raises(ValueError, match="global_routing_threshold"):
        GliderConfig(global_routing_threshold=1.5)
    with pytest.raises(ValueError, match="global_routing_scale_unmatched"):
        GliderConfig(global_routing_scale_unmatched=math.inf)


def test_model_card_states_the_policy_and_the_self_routing_pipeline():
    experts = [{"name": "qa", "target_modules": ["q"], "r": 2}, {"name": "nli", "target_modules": ["q"], "r": 2}]
    config = GliderConfig(
        experts=experts,
        instruction_embedding_dim=384,
        instruction_embedding_model="sentence-transformers/all-MiniLM-L6-v2",
        global_routing_policy="threshold",
        global_routing_threshold=0.35,
        global_routing_scale_unmatched=2.0,
    )
    card = str(render_model_card(config, "org/policy", license=None))
    assert "| alpha policy (`global_routing_policy`) | threshold: alpha = 100.0 when a query's best cosine" in card
    assert "reaches 0.35, else 2.0 |" in card
    assert 'generator("your query", return_experts=True)' in card
    assert "`sentence-transformers/all-MiniLM-L6-v2`, the model that embedded the experts' instructions" in card
