"""generate(): greedy against a hand-written decoding loop, beam search, KV cache, padding, threads.

Token ids from runs batched, padded, cached or threaded differently are compared exactly only after
`assert_decisive` has checked that no choice of the reference run is a near tie (see tests/conftest.py).
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from modeling_glider import GliderT5ForConditionalGeneration
from tests.conftest import EMBED_DIM, assert_decisive, make_base, make_expert

NEW_TOKENS = 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base = make_base(seed=6)
    embeddings = torch.eye(3, EMBED_DIM)
    dirs = [make_expert(root, base, f"task{i}", r=4, seed=30 + i, embedding=embeddings[i]) for i in range(3)]
    return GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=4.0)


def rows_and_embeddings(lengths=(7, 4, 5)):
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(2, 64, (n,), generator=g) for n in lengths]
    u = torch.randn(len(lengths), EMBED_DIM, generator=g)
    return rows, u


def pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def greedy_by_hand(model, ids, u):
    """Decoding without cache or generate(): the full prefix through forward(), argmax, until EOS or the limit."""
    decoded = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(NEW_TOKENS):
        logits = model(input_ids=ids, decoder_input_ids=decoded, instruction_embeddings=u, use_cache=False).logits
        decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        if decoded[0, -1] == model.config.eos_token_id:
            break
    return decoded


@torch.no_grad()
def test_greedy_equals_hand_written_loop(model):
    rows, u = rows_and_embeddings()
    for row, emb in zip(rows, u):
        expected = greedy_by_hand(model, row[None], emb[None])
        got = model.generate(
            input_ids=row[None], instruction_embeddings=emb[None], max_new_tokens=NEW_TOKENS, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        assert_decisive(got)
        assert torch.equal(got.sequences, expected)
    # without an instruction embedding (local routing only) the same holds
    expected = greedy_by_hand(model, rows[0][None], None)
    got = model.generate(
        input_ids=rows[0][None], max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert_decisive(got)
    assert torch.equal(got.sequences, expected)


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cache_on_and_off_agree(model, num_beams):
    rows, u = rows_and_embeddings()
    ids, mask = pad(rows)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        instruction_embeddings=u,
        max_new_tokens=NEW_TOKENS,
        num_beams=num_beams,
        do_sample=False,
    )
    cached = model.generate(**kwargs, use_cache=True, output_scores=True, return_dict_in_generate=True)
    assert_decisive(cached, num_beams)
    assert torch.equal(cached.sequences, model.generate(**kwargs, use_cache=False))


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
def test_padded_batch_equals_unpadded_rows(model, num_beams):
    rows, u = rows_and_embeddings()
    ids, mask = pad(rows)
    common = dict(max_new_tokens=NEW_TOKENS, num_beams=num_beams, do_sample=False)
    batched = model.generate(input_ids=ids, attention_mask=mask, instruction_embeddings=u, **common)
    for i, row in enumerate(rows):
        single = model.generate(
            input_ids=row[None], instruction_embeddings=u[i : i + 1], output_scores=True, return_dict_in_generate=True,
            **common,
        )  # fmt: skip
        assert_decisive(single, num_beams)
        single = single.sequences
        n = single.shape[1]
        assert torch.equal(batched[i, :n], single[0])
        assert (batched[i, n:] == model.config.pad_token_id).all()


@torch.no_grad()
def test_beam_search_routes_each_query_by_its_own_embedding(model):
    rows, _ = rows_and_embeddings(lengths=(6, 6))
    ids = torch.stack(rows)
    u = torch.eye(2, EMBED_DIM)
    common = dict(max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    batched = model.generate(input_ids=ids, instruction_embeddings=u, **common)
    for i in range(2):
        single = model.generate(
            input_ids=ids[i : i + 1], instruction_embeddings=u[i : i + 1], output_scores=True,
            return_dict_in_generate=True, **common,
        )  # fmt: skip
        assert_decisive(single, num_beams=3)
        assert torch.equal(batched[2 * i : 2 * i + 2, : single.sequences.shape[1]], single.sequences)


@torch.no_grad()
def test_generate_routing_record_folds_beams_onto_queries(model):
    rows, _ = rows_and_embeddings(lengths=(6, 6))
    ids = torch.stack(rows)
    u = torch.eye(2, EMBED_DIM) * 3
    out = model.generate(
        input_ids=ids, instruction_embeddings=u, max_new_tokens=3, num_beams=2, do_sample=False,
        output_routing=True, return_dict_in_generate=True,
    )  # fmt: skip
    usage = out.routing.expert_usage(num_experts=3, batch_size=2)
    torch.testing.assert_close(usage.sum(-1), torch.ones(2))
    assert usage[0].argmax() == 0 and usage[1].argmax() == 1  # alpha * cos favours each query's own expert
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        model.generate(input_ids=ids, output_routing=True, max_new_tokens=2)


@torch.no_grad()
def test_routing_usage_ignores_padding_and_finished_rows(model):
    # Each row's usage shares in a padded batch, where one row finishes early and is fed pad tokens, equal the shares
    # of that row generated alone (no padding, stops at its end of sequence).
    rows, u = rows_and_embeddings()
    common = dict(
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_routing=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    first = model.generate(input_ids=rows[0][None], instruction_embeddings=u[:1], **common).sequences
    eos = int(first[0, 3])  # row 0 ends after three tokens (unless the others emit it earlier)
    # the random model rarely emits its own EOS: this call's eos_token_id is the one it will emit (the config's differs)
    assert eos != model.config.eos_token_id
    common["eos_token_id"] = eos
    singles = [model.generate(input_ids=r[None], instruction_embeddings=e[None], **common) for r, e in zip(rows, u)]
    ids, mask = pad(rows)
    batched = model.generate(input_ids=ids, attention_mask=mask, instruction_embeddings=u, **common)
    assert min(s.sequences.shape[1] for s in singles) < batched.sequences.shape[1]  # some row ran past its end
    usage = batched.routing.expert_usage(num_experts=3, batch_size=len(rows))
    for i, single in enumerate(singles):
        assert_decisive(single, eos_token_id=eos)
        n = single.sequences.shape[1]
        assert torch.equal(batched.sequences[i, :n], single.sequences[0])
        torch.testing.assert_close(usage[i], single.routing.expert_usage(3, 1)[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_threads_sharing_one_model_match_sequential_calls(model):
    g = torch.Generator().manual_seed(3)
    jobs = [(torch.randint(2, 64, (1, 6), generator=g), torch.randn(1, EMBED_DIM, generator=g)) for _ in range(8)]

    @torch.no_grad()  # grad mode is per thread
    def run(job):
        ids, u = job
        logits = model(
            input_ids=ids, decoder_input_ids=torch.zeros(1, 3, dtype=torch.long), instruction_embeddings=u
        ).logits
        generated = model.generate(
            input_ids=ids, instruction_embeddings=u, max_new_tokens=5, do_sample=False, output_scores=True,
            return_dict_in_generate=True,
        )  # fmt: skip
        return logits, generated

    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(run, jobs * 3))
    for i, (logits, generated) in enumerate(threaded):
        expected_logits, expected = sequential[i % len(jobs)]
        # a thread may split work differently (its own intra-op thread count): rounding apart, not bit for bit
        torch.testing.assert_close(logits, expected_logits, atol=1e-5 * max(1.0, expected_logits.abs().max()), rtol=0)
        assert_decisive(expected)
        assert torch.equal(generated.sequences, expected.sequences)
    assert len({tuple(s[1].sequences.flatten().tolist()) for s in sequential}) > 1  # the jobs differ


@torch.no_grad()
def test_forward_from_encoder_outputs_and_labels(model):
    # Training-style calls that give neither input_ids nor decoder_input_ids still route by the instruction embedding.
    rows, u = rows_and_embeddings(lengths=(6, 6))
    ids = torch.stack(rows)
    labels = ids[:, :3].contiguous()
    expected = model(input_ids=ids, labels=labels, instruction_embeddings=u)
    encoder_outputs = model.get_encoder()(input_ids=ids, global_routing_logits=model.global_routing_logits(u))
    got = model(encoder_outputs=encoder_outputs, labels=labels, instruction_embeddings=u)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
