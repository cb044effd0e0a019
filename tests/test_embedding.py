"""The instruction embedder against sentence-transformers itself, and the checks that keep queries and experts in one
embedding space."""

import shutil

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.embedding import (
    DEFAULT_EMBEDDING_MODEL,
    InstructionEmbedder,
    check_embedder_matches,
    load_embedder,
    packaged_model_path,
)
from tests.conftest import make_base, make_expert

TEXTS = [
    "Decide whether the movie review is positive or negative.",
    "Translate the English sentence into French.",
    "Solve the arithmetic problem and answer with a number.",
]


@pytest.fixture(scope="module")
def minilm() -> InstructionEmbedder:
    return load_embedder(DEFAULT_EMBEDDING_MODEL)


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(packaged_model_path(DEFAULT_EMBEDDING_MODEL)), device="cpu")


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """Another embedder: a small random BERT (a plain Transformers encoder) with MiniLM's tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    BertModel(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(packaged_model_path(DEFAULT_EMBEDDING_MODEL) / name, directory / name)
    return directory


def test_default_is_the_packaged_minilm(minilm, reference):
    assert minilm.model_id == "sentence-transformers/all-MiniLM-L6-v2" and minilm.dim == 384
    assert InstructionEmbedder(packaged_model_path(DEFAULT_EMBEDDING_MODEL)).model_id == DEFAULT_EMBEDDING_MODEL
    expected = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(minilm.embed(TEXTS), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(minilm.embed(TEXTS).norm(dim=-1), torch.ones(3))


def test_transformers_backend_equals_sentence_transformers(reference, tiny_encoder_dir):
    plain = InstructionEmbedder(DEFAULT_EMBEDDING_MODEL, backend="transformers")
    assert plain.pooling == "mean" and plain.max_length == reference.max_seq_length == 256
    expected = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(plain.embed(TEXTS), expected, atol=1e-5, rtol=1e-5)
    # a plain Transformers encoder by path: sentence-transformers wraps it with mean pooling, as we do
    wrapped = SentenceTransformer(str(tiny_encoder_dir), device="cpu")
    ours = InstructionEmbedder(tiny_encoder_dir, backend="transformers")
    assert ours.dim == 32
    expected = torch.nn.functional.normalize(wrapped.encode(TEXTS, convert_to_tensor=True), dim=-1)
    torch.testing.assert_close(ours.embed(TEXTS), expected, atol=1e-5, rtol=1e-5)


def test_cache_is_bounded_and_transparent(reference):
    embedder = InstructionEmbedder(cache_size=2)
    encoded = []  # the texts each call computes
    encode = embedder._encode
    embedder._encode = lambda texts: encoded.append(list(texts)) or encode(texts)
    first = embedder.embed(TEXTS)
    assert len(embedder._cache) == 2
    again = embedder.embed([TEXTS[2], TEXTS[0], TEXTS[2]])  # one cached, one recomputed, one repeated
    assert encoded == [TEXTS, [TEXTS[0]]]  # the evicted text alone is computed again, once
    assert len(embedder._cache) == 2
    # A hit returns what was computed, bit for bit: the same tensor, not a recomputation.
    assert torch.equal(again[0], first[2]) and torch.equal(again[2], first[2])
    # TEXTS[0] was embedded in a batch of 3, then alone: the same text batched differently agrees to fp32 rounding
    # (unit vectors, so 1e-5 is ~100x that), and both are the reference's embedding of it.
    torch.testing.assert_close(again[1], first[0], atol=1e-5, rtol=0)
    expected = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(again, expected[[2, 0, 2]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sentence-transformers", "transformers"])
def test_empty_and_very_long_texts(reference, backend):
    embedder = InstructionEmbedder(backend=backend)
    with pytest.raises(ValueError, match="Instruction #1 is empty"):
        embedder.embed(["Translate it.", "   "])
    with pytest.raises(TypeError, match="#0 must be a string"):
        embedder.embed([3])
    head = " ".join(["Translate the English sentence into French."] * 60)  # well over 256 tokens
    long_a = head + " " + "alpha " * 20000
    long_b = head + " " + "omega zulu " * 5000
    got = embedder.embed([long_a, long_b])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], got[1], atol=1e-6, rtol=0)  # only the first 256 tokens count
    expected = reference.encode([head], convert_to_tensor=True, normalize_embeddings=True)[0]
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


def test_embedder_mismatch_and_wrong_width_are_refused(tmp_path, minilm, tiny_encoder_dir):
    base = make_base()
    dirs = [make_expert(tmp_path, base, f"e{i}", seed=i, embedding=minilm.embed(TEXTS[i])[0]) for i in range(3)]
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, instruction_embedding_model=minilm.model_id)
    check_embedder_matches(model.config, minilm)

    other = InstructionEmbedder(tiny_encoder_dir)
    with pytest.raises(ValueError, match="embedded with 'sentence-transformers/all-MiniLM-L6-v2'.*tiny-encoder"):
        check_embedder_matches(model.config, other)
    # the same model stored elsewhere may be declared as such
    copy = shutil.copytree(packaged_model_path(DEFAULT_EMBEDDING_MODEL), tmp_path / "minilm-copy")
    check_embedder_matches(model.config, InstructionEmbedder(copy, model_id=DEFAULT_EMBEDDING_MODEL))
    with pytest.raises(ValueError, match="embedded with"):
        check_embedder_matches(model.config, InstructionEmbedder(copy))

    unnamed = GliderT5ForConditionalGeneration.from_experts(base, dirs)  # no recorded embedding model: width only
    with pytest.raises(ValueError, match="makes 32-wide embeddings.*384-wide"):
        check_embedder_matches(unnamed.config, other)
    with pytest.raises(ValueError, match=r"instruction_embeddings must be a float tensor \[batch, 384\]"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), decoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
              instruction_embeddings=other.embed(["x y z"]))  # fmt: skip


def test_unloadable_embedder_names_it(tmp_path):
    with pytest.raises(ValueError, match="Could not load the instruction embedder .*no-such-model"):
        InstructionEmbedder(tmp_path / "no-such-model", backend="transformers")


# The paper's embedder family: a model that needs a task prefix, Matryoshka truncation, recorded in the config.


@pytest.fixture(scope="module")
def prefixed_st_dir(tiny_encoder_dir, tmp_path_factory):
    """A tiny local sentence-transformers model whose saved config declares nomic-style prompts."""
    from sentence_transformers import models

    directory = tmp_path_factory.mktemp("prefixed-st")
    modules = [models.Transformer(str(tiny_encoder_dir)), models.Pooling(32, pooling_mode="mean"), models.Normalize()]
    model = SentenceTransformer(modules=modules, device="cpu", prompts={"query": "search_query: "})
    model.save(str(directory))
    return directory


def test_prefix_and_truncation_follow_sentence_transformers(prefixed_st_dir):
    reference = SentenceTransformer(str(prefixed_st_dir), device="cpu")
    embedder = InstructionEmbedder(prefixed_st_dir, prefix="search_query: ", truncate_dim=16)
    assert embedder.dim == 16 and embedder.prefix == "search_query: "
    full = reference.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    expected = torch.nn.functional.normalize(full[:, :16], dim=-1)
    torch.testing.assert_close(embedder.embed(TEXTS), expected, atol=1e-5, rtol=1e-5)
    plain = reference.encode(TEXTS, convert_to_tensor=True)
    assert not torch.allclose(torch.nn.functional.normalize(plain[:, :16], dim=-1), expected, atol=1e-3)
    with pytest.raises(ValueError, match="truncate_dim = 64 exceeds .*width 32"):
        InstructionEmbedder(prefixed_st_dir, truncate_dim=64)


def test_the_pipeline_embeds_queries_as_the_config_records(prefixed_st_dir, tokenizer, tmp_path):
    from transformers import pipeline

    from configuration_glider import GliderConfig

    base = make_base()
    g = torch.Generator().manual_seed(0)
    dirs = [make_expert(tmp_path, base, f"e{i}", seed=i, embedding=torch.randn(16, generator=g)) for i in range(2)]
    fields = dict(
        instruction_embedding_model=str(prefixed_st_dir),
        instruction_embedding_prefix="search_query: ",
        instruction_embedding_truncate_dim=16,
    )
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1, **fields)
    model.save_pretrained(tmp_path / "saved")
    saved = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    for name, value in fields.items():
        assert getattr(saved.config, name) == value
    with pytest.raises(ValueError, match="instruction_embedding_prefix describes the tensors"):
        saved.config.instruction_embedding_prefix = ""
    with pytest.raises(ValueError, match="instruction_embedding_truncate_dim = 8 must equal instruction_embedding_dim"):
        GliderConfig(instruction_embedding_dim=16, instruction_embedding_truncate_dim=8)

    generator = pipeline("text2text-generation", model=saved, tokenizer=tokenizer)
    reference = SentenceTransformer(str(prefixed_st_dir), device="cpu")
    full = reference.encode(TEXTS, prompt="search_query: ", convert_to_tensor=True)
    torch.testing.assert_close(
        generator.instruction_embedder.embed(TEXTS), torch.nn.functional.normalize(full[:, :16], dim=-1)
    )
    with pytest.raises(ValueError, match=r"prefix 'search_query: ' \(instruction_embedding_prefix\)"):
        check_embedder_matches(saved.config, InstructionEmbedder(prefixed_st_dir, truncate_dim=16))
