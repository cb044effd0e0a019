"""Expert descriptors fitted to embedded samples of the experts' inputs (`global_routing_descriptor`).

References are independent of the code under test: the scores by their formula written here, the fit re-stated as a
plain per-expert loop, outcomes on synthetic clusters whose instructions deliberately point to the wrong cluster, and
the rows of expert files written here with safetensors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import pipeline

from benchmarks.glider_mini.library import export_experts
from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.cli import main
from modeling_glider.describe import describe_experts
from modeling_glider.embedding import DEFAULT_EMBEDDING_MODEL, InstructionEmbedder, load_config_embedder, load_embedder
from modeling_glider.routing import DESCRIPTOR_LEARNING_RATE, DESCRIPTOR_STEPS, DESCRIPTOR_TEMPERATURE
from modeling_glider.training import train_expert, train_gates
from tests.conftest import EMBED_DIM, make_base, make_expert

QUIET = {"disable_tqdm": True, "logging_steps": 1000}
NAMES = ["a", "b", "c", "d", "plain"]
COUNTS = [6, 3, 9, 5, 0]  # "plain" has no samples


class LetterEmbedder(InstructionEmbedder):
    """Embeddings without a model: counts of eight letters in the text, normalised. A fixed, independent function."""

    def __init__(self, model_id: str = "letter-counts", letters: str = "abcdefgh", prefix: str = ""):
        self.model_id, self.letters, self.prefix, self.location = model_id, letters, prefix, model_id

    @property
    def dim(self) -> int:
        return len(self.letters)

    def embed(self, texts):
        texts = [self.prefix + text for text in texts]
        counts = torch.tensor([[1.0 + text.lower().count(c) for c in self.letters] for text in texts])
        return counts / counts.norm(dim=1, keepdim=True)


def unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp(min=1e-30), 0.0)


def cosines(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return unit(u.double()) @ unit(W.double()).T


def add_samples(directory: Path, rows: torch.Tensor) -> None:
    """Put embedded samples into an expert's glider_expert.safetensors (as describe-experts would)."""
    tensors = load_file(directory / "glider_expert.safetensors")
    save_file({**tensors, "sample_embeddings": rows.float().contiguous()}, directory / "glider_expert.safetensors")


def clusters(seed: int = 0):
    """Five well-separated unit directions in EMBED_DIM dimensions, and a sampler of noisy points around them."""
    g = torch.Generator().manual_seed(seed)
    centres = unit(torch.randn(len(NAMES), EMBED_DIM, generator=g))

    def around(e: int, n: int) -> torch.Tensor:
        return centres[e] + 0.08 * torch.randn(n, EMBED_DIM, generator=g)

    return centres, around


def instruction_of(e: int, centres: torch.Tensor) -> torch.Tensor:
    """Expert e's instruction embedding: the next expert's centre if it has samples, else its own; never unit length."""
    return (1.5 + 0.5 * e) * (centres[(e + 1) % 4] if COUNTS[e] else centres[e])


@pytest.fixture(scope="module")
def base():
    return make_base(seed=3)


@pytest.fixture(scope="module")
def library(tmp_path_factory, base):
    """Experts a-d with samples around their own cluster centre but an instruction embedding at the NEXT expert's
    centre (a misleading instruction); "plain" with no samples and an instruction at its own centre."""
    root = tmp_path_factory.mktemp("experts")
    centres, around = clusters()
    dirs, rows = [], []
    for e, (name, count) in enumerate(zip(NAMES, COUNTS)):
        directory = make_expert(
            root, base, name, r=2, seed=e, embedding=instruction_of(e, centres), instruction=f"Task {name}."
        )
        rows.append(around(e, count) if count else None)
        if count:
            add_samples(directory, rows[-1])
        dirs.append(directory)
    return dirs, rows, centres, around


def build(base, dirs, **kwargs):
    kwargs = {"top_k": 2, "global_routing_scale": 50.0, "global_routing_descriptor": "samples", **kwargs}
    return GliderT5ForConditionalGeneration.from_experts(base, dirs, **kwargs)


@pytest.fixture(scope="module")
def model(base, library):
    return build(base, library[0])


def reference_fit(instructions: torch.Tensor, rows: list) -> torch.Tensor:
    """The cosine classifier re-stated: unit descriptors W_e, started at each expert's (raw) sample mean, trained by
    full-batch Adam on the mean over experts with samples of each expert's mean cross-entropy of softmax_e(T cos(s, W_e));
    an expert without samples is fixed at its unit instruction embedding."""
    fixed = [r is None for r in rows]
    start = [unit(instructions[e]) if fixed[e] else unit(rows[e].mean(dim=0)) for e in range(len(rows))]
    W = torch.stack(start).clone().requires_grad_()
    optimizer = torch.optim.Adam([W], lr=DESCRIPTOR_LEARNING_RATE)
    for _ in range(DESCRIPTOR_STEPS):
        descriptors = torch.stack([start[e] if fixed[e] else W[e] / W[e].norm() for e in range(len(rows))])
        per_expert = []
        for e, samples in enumerate(rows):
            if samples is not None:
                logits = DESCRIPTOR_TEMPERATURE * (samples / samples.norm(dim=-1, keepdim=True)) @ descriptors.T
                per_expert.append(-torch.log_softmax(logits, dim=-1)[:, e].mean())
        loss = torch.stack(per_expert).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.stack([start[e] if fixed[e] else W[e] / W[e].norm() for e in range(len(rows))])


def queries(around, per_cluster: int = 4) -> tuple[torch.Tensor, list[int]]:
    points = [around(e, per_cluster) for e in range(4)]
    return torch.cat(points), [e for e in range(4) for _ in range(per_cluster)]


# 1. Scores and fit


@pytest.mark.parametrize("descriptor", ["instruction", "samples", "both"])
def test_global_logits_follow_the_formula(model, library, descriptor):
    _, _, _, around = library
    u, _ = queries(around, 2)
    u = torch.cat([u, torch.zeros(1, EMBED_DIM), 3.0 * torch.randn(2, EMBED_DIM)])  # a row of zeros: no global term
    router, alpha = model.global_router, model.config.global_routing_scale
    instruction = cosines(u, router.expert_embeddings)
    fitted = cosines(u, router.expert_descriptors)
    score = {"instruction": instruction, "samples": fitted, "both": (instruction + fitted) / 2}[descriptor]
    previous = model.config.global_routing_descriptor
    try:
        model.config.global_routing_descriptor = descriptor
        got = model.global_routing_logits(u)
    finally:
        model.config.global_routing_descriptor = previous
    torch.testing.assert_close(got.double(), alpha * score, atol=1e-5 * alpha, rtol=0)
    assert got.abs().max() <= alpha * (1 + 1e-6)
    assert descriptor == "instruction" or (fitted - instruction).abs().max() > 0.1  # the two descriptors differ


def test_threshold_policy_thresholds_the_fitted_score(base, library):
    dirs, _, _, around = library
    big, small, threshold = 40.0, 2.0, 0.9
    glider = build(base, dirs, global_routing_scale=big, global_routing_policy="threshold",
                   global_routing_threshold=threshold, global_routing_scale_unmatched=small)  # fmt: skip
    u = torch.cat([queries(around, 2)[0], torch.randn(4, EMBED_DIM, generator=torch.Generator().manual_seed(9))])
    score = cosines(u, glider.global_router.expert_descriptors)
    matched = score.max(dim=-1, keepdim=True).values >= threshold
    assert matched.any() and not matched.all()  # both branches are taken
    expected = torch.where(matched, big, small) * score
    torch.testing.assert_close(glider.global_routing_logits(u).double(), expected, atol=1e-5 * big, rtol=0)


def test_fit_matches_a_plain_restatement(model, library):
    _, rows, centres, _ = library
    instructions = torch.stack([instruction_of(e, centres) for e in range(len(NAMES))])
    expected = reference_fit(instructions, rows)
    got = model.global_router.expert_descriptors
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(NAMES)), atol=1e-5, rtol=0)
    start = torch.stack([unit(r.mean(dim=0)) for r in rows[:4]])
    assert (got[:4] - start).abs().max() > 1e-3  # the fit moved the descriptors away from the centroids


def test_samples_route_to_their_own_expert_where_the_instruction_misleads(model, library):
    _, _, centres, around = library
    u, truth = queries(around, 6)
    assert cosines(u, centres).argmax(dim=-1).tolist() == truth  # the setup is sound: each query is in its cluster
    previous = model.config.global_routing_descriptor
    try:
        by_descriptor = {}
        for descriptor in ("samples", "instruction"):
            model.config.global_routing_descriptor = descriptor
            by_descriptor[descriptor] = model.global_routing_logits(u).argmax(dim=-1).tolist()
    finally:
        model.config.global_routing_descriptor = previous
    assert by_descriptor["samples"] == truth
    assert all(got != want for got, want in zip(by_descriptor["instruction"], truth))


def test_an_expert_without_samples_keeps_its_instruction(model, library):
    _, _, centres, _ = library
    router = model.global_router
    torch.testing.assert_close(router.expert_descriptors[4], unit(centres[4]), atol=1e-6, rtol=0)
    torch.testing.assert_close(router.expert_embeddings[4], instruction_of(4, centres), atol=1e-6, rtol=0)


# 2. Library changes and round trips


def test_library_holds_each_experts_rows_and_counts(model, library):
    _, rows, _, _ = library
    assert [e["samples"] for e in model.config.experts] == COUNTS
    samples = model.global_router.expert_samples
    assert tuple(samples.shape) == (len(NAMES), max(COUNTS), EMBED_DIM)
    for e, count in enumerate(COUNTS):
        if count:
            assert torch.equal(samples[e, :count], rows[e])  # a copy of the file's rows
        assert not samples[e, count:].any()


def test_save_and_load_keep_samples_descriptors_and_logits(model, library, tmp_path):
    _, _, _, around = library
    model.save_pretrained(tmp_path / "model")
    loaded = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert loaded.config.global_routing_descriptor == "samples"
    assert [e["samples"] for e in loaded.config.experts] == COUNTS
    for name in ("expert_embeddings", "expert_samples", "expert_descriptors"):
        assert torch.equal(getattr(loaded.global_router, name), getattr(model.global_router, name)), name
    u, _ = queries(around, 2)
    assert torch.equal(loaded.global_routing_logits(u), model.global_routing_logits(u))
    ids = torch.randint(2, 64, (len(u), 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=ids[:, :3], instruction_embeddings=u).logits
        got = loaded(input_ids=ids, decoder_input_ids=ids[:, :3], instruction_embeddings=u).logits
    assert torch.equal(got, want)


def test_adding_experts_one_by_one_fits_as_a_build(base, model, library):
    dirs, _, _, _ = library
    grown = build(base, dirs[:1], top_k=1)
    for directory in dirs[1:]:
        grown.add_expert(directory)
    assert grown.config.experts == model.config.experts
    for name in ("expert_embeddings", "expert_samples"):  # copies of the files' rows
        assert torch.equal(getattr(grown.global_router, name), getattr(model.global_router, name)), name
    torch.testing.assert_close(grown.global_router.expert_descriptors, model.global_router.expert_descriptors,
                               atol=1e-4, rtol=0)  # fmt: skip


@pytest.mark.parametrize("removed", [1, 4])
def test_remove_then_add_back_refits(base, model, library, removed):
    dirs, _, _, _ = library
    changed = build(base, dirs)
    changed.remove_expert(NAMES[removed])
    others = [d for i, d in enumerate(dirs) if i != removed]
    without = build(base, others)
    assert changed.config.experts == without.config.experts
    for name in ("expert_embeddings", "expert_samples"):
        assert torch.equal(getattr(changed.global_router, name), getattr(without.global_router, name)), name
    torch.testing.assert_close(changed.global_router.expert_descriptors, without.global_router.expert_descriptors,
                               atol=1e-4, rtol=0)  # fmt: skip
    if removed != 4:  # without b, the others' descriptors move: the fit is over the library
        kept = [i for i in range(len(NAMES)) if i != removed]
        moved = changed.global_router.expert_descriptors - model.global_router.expert_descriptors[kept]
        assert moved.abs().max() > 1e-4
    changed.add_expert(dirs[removed])
    order = [*others, dirs[removed]]
    assert changed.config.expert_names == [d.name for d in order]
    rebuilt = build(base, order)
    for name in ("expert_embeddings", "expert_samples"):
        assert torch.equal(getattr(changed.global_router, name), getattr(rebuilt.global_router, name)), name
    torch.testing.assert_close(changed.global_router.expert_descriptors, rebuilt.global_router.expert_descriptors,
                               atol=1e-4, rtol=0)  # fmt: skip
    by_name = dict(zip(changed.config.expert_names, changed.global_router.expert_descriptors))
    for name, descriptor in zip(NAMES, model.global_router.expert_descriptors):
        torch.testing.assert_close(by_name[name], descriptor, atol=1e-4, rtol=0)


def test_a_library_without_samples_gains_them_by_add_expert(base, library):
    dirs, rows, _, _ = library
    plain = GliderT5ForConditionalGeneration.from_experts(base, [dirs[4]], top_k=1)
    assert plain.global_router.expert_samples is None and plain.config.experts[0]["samples"] == 0
    plain.add_expert(dirs[1])
    assert [e["samples"] for e in plain.config.experts] == [0, COUNTS[1]]
    assert torch.equal(plain.global_router.expert_samples[1], rows[1])
    want = build(base, [dirs[4], dirs[1]], top_k=1).global_router.expert_descriptors
    torch.testing.assert_close(plain.global_router.expert_descriptors, want, atol=1e-4, rtol=0)


def test_export_then_build_gives_the_same_samples(base, model, tmp_path):
    exported = export_experts(model, tmp_path / "exported")
    for directory, count in zip(exported, COUNTS):
        assert ("sample_embeddings" in load_file(directory / "glider_expert.safetensors")) == bool(count)
    rebuilt = build(base, exported)
    assert [e["samples"] for e in rebuilt.config.experts] == COUNTS
    assert torch.equal(rebuilt.global_router.expert_samples, model.global_router.expert_samples)
    torch.testing.assert_close(rebuilt.global_router.expert_descriptors, model.global_router.expert_descriptors,
                               atol=1e-4, rtol=0)  # fmt: skip


def test_cli_build_with_the_samples_descriptor(base, model, library, tmp_path, capsys):
    dirs, _, _, around = library
    base.save_pretrained(tmp_path / "base")
    argv = ["build", "--base", str(tmp_path / "base"), "--experts", *map(str, dirs), "--out", str(tmp_path / "glider"),
            "--global-routing-scale", "50", "--global-routing-descriptor", "samples"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    built = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "glider")
    assert built.config.global_routing_descriptor == "samples"
    assert [e["samples"] for e in built.config.experts] == COUNTS
    assert torch.equal(built.global_router.expert_samples, model.global_router.expert_samples)
    u, _ = queries(around, 2)
    want = model.global_routing_logits(u)
    torch.testing.assert_close(built.global_routing_logits(u), want, atol=1e-4 * want.abs().max(), rtol=0)


# 3. Writers

DATA = {
    "alpha": [{"input": text} for text in ("abba cab", "bead", "face", "hedge", "gag", "cabbage", "egg")],
    "beta": ["ahead", "badge"],  # fewer than asked for: all of them
}


@pytest.fixture
def undescribed(tmp_path, base):
    root = tmp_path / "experts"
    return [make_expert(root, base, name, r=2, seed=i, instruction=f"Do {name}.") for i, name in enumerate(["alpha", "beta", "gamma"])]  # fmt: skip


def rows_are_embedded_inputs(rows: torch.Tensor, inputs: list[str], embedder) -> None:
    """Each row is the embedding of one of `inputs`, no input twice."""
    texts = [t if isinstance(t, str) else t["input"] for t in inputs]
    reference = embedder.embed(texts)
    distance = (rows[:, None, :] - reference[None, :, :]).abs().amax(dim=-1)  # [rows, inputs]
    nearest = distance.argmin(dim=-1)
    assert distance.min(dim=-1).values.max() < 1e-5
    assert len(set(nearest.tolist())) == len(rows)


def test_describe_embeds_n_inputs_per_expert_and_keeps_them(undescribed, base):
    embedder = LetterEmbedder()
    describe_experts(undescribed, data=DATA, samples=4, embedder=embedder)
    files = {d.name: load_file(d / "glider_expert.safetensors") for d in undescribed}
    assert files["alpha"]["sample_embeddings"].shape == (4, EMBED_DIM)
    assert files["beta"]["sample_embeddings"].shape == (2, EMBED_DIM)
    assert "sample_embeddings" not in files["gamma"]
    rows_are_embedded_inputs(files["alpha"]["sample_embeddings"], DATA["alpha"], embedder)
    rows_are_embedded_inputs(files["beta"]["sample_embeddings"], DATA["beta"], embedder)
    for directory in undescribed:  # instructions unchanged, embedded by the same embedder
        meta = json.loads((directory / "glider_expert.json").read_text())
        assert meta["instruction"] == f"Do {directory.name}." and meta["embedding_model"] == "letter-counts"
        torch.testing.assert_close(
            files[directory.name]["instruction_embedding"], embedder.embed([meta["instruction"]])[0]
        )

    describe_experts(undescribed, instructions={"gamma": "Do gamma anew."}, embedder=embedder)  # no data: kept
    for directory in undescribed[:2]:
        again = load_file(directory / "glider_expert.safetensors")["sample_embeddings"]
        assert torch.equal(again, files[directory.name]["sample_embeddings"])
    glider = GliderT5ForConditionalGeneration.from_experts(base, undescribed, top_k=2, global_routing_descriptor="both")
    assert [e["samples"] for e in glider.config.experts] == [4, 2, 0]


def test_describe_with_another_embedder_needs_the_data_again(undescribed):
    describe_experts(undescribed, data=DATA, samples=3, embedder=LetterEmbedder())
    other = LetterEmbedder("reversed-letters", letters="hgfedcba")
    describe_experts(undescribed, data=DATA, samples=3, embedder=other)  # embedded anew
    rows = load_file(undescribed[0] / "glider_expert.safetensors")["sample_embeddings"]
    rows_are_embedded_inputs(rows, DATA["alpha"], other)
    assert json.loads((undescribed[0] / "glider_expert.json").read_text())["embedding_model"] == "reversed-letters"


def test_describe_samples_are_chosen_by_the_seed(undescribed):
    describe_experts(undescribed[:1], data={"alpha": DATA["alpha"]}, samples=3, embedder=LetterEmbedder(), seed=0)
    first = load_file(undescribed[0] / "glider_expert.safetensors")["sample_embeddings"]
    describe_experts(undescribed[:1], data={"alpha": DATA["alpha"]}, samples=3, embedder=LetterEmbedder(), seed=0)
    assert torch.equal(load_file(undescribed[0] / "glider_expert.safetensors")["sample_embeddings"], first)
    picks = set()
    for seed in range(1, 6):
        describe_experts(
            undescribed[:1], data={"alpha": DATA["alpha"]}, samples=3, embedder=LetterEmbedder(), seed=seed
        )
        picks.add(
            tuple(load_file(undescribed[0] / "glider_expert.safetensors")["sample_embeddings"].flatten().tolist())
        )
    assert len(picks) > 1


def test_train_gates_keeps_sample_embeddings(tmp_path, tokenizer):
    base = make_base(seed=1, vocab_size=len(tokenizer))
    expert = make_expert(tmp_path, base, "words", r=2, seed=1, embedding=torch.ones(EMBED_DIM), instruction="Old.")
    rows = torch.randn(3, EMBED_DIM, generator=torch.Generator().manual_seed(4))
    add_samples(expert, rows)
    before = load_file(expert / "glider_expert.safetensors")
    data = [{"input": "reverse the word apple", "target": "elppa"}] * 4
    train_gates(base, expert, data, tokenizer=tokenizer, steps=1, trainer_args=QUIET)
    after = load_file(expert / "glider_expert.safetensors")
    assert torch.equal(after["sample_embeddings"], rows)
    assert torch.equal(after["instruction_embedding"], before["instruction_embedding"])
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("gate."))  # the gates were trained


def test_train_expert_writes_sample_embeddings(tmp_path, tokenizer):
    base = make_base(seed=1, vocab_size=len(tokenizer))
    rows = torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(5))
    data = [{"input": "reverse the word apple", "target": "elppa"}] * 4
    out = train_expert(base, data, tmp_path / "words", name="words", tokenizer=tokenizer, r=2, target_modules=["q"],
                       steps=1, gate_steps=1, instruction_embedding=torch.ones(EMBED_DIM), sample_embeddings=rows,
                       trainer_args=QUIET)  # fmt: skip
    assert torch.equal(load_file(out / "glider_expert.safetensors")["sample_embeddings"], rows)
    glider = GliderT5ForConditionalGeneration.from_experts(base, [out], top_k=1, global_routing_descriptor="samples")
    assert glider.config.experts[0]["samples"] == 2


def test_cli_describe_experts_embeds_n_samples(undescribed, tmp_path, capsys):
    data = tmp_path / "alpha.jsonl"
    inputs = ["Reverse the word apple.", "Reverse the word pear.", "Reverse the word plum.", "Reverse the word fig."]
    data.write_text("\n".join(json.dumps({"input": text, "target": "x"}) for text in inputs) + "\n")
    assert main(["describe-experts", *map(str, undescribed[:2]), "--data", f"alpha={data}", "--samples", "3"]) == 0
    capsys.readouterr()
    rows = load_file(undescribed[0] / "glider_expert.safetensors")["sample_embeddings"]
    assert rows.shape == (3, 384)
    rows_are_embedded_inputs(rows, inputs, load_embedder(DEFAULT_EMBEDDING_MODEL))
    assert "sample_embeddings" not in load_file(undescribed[1] / "glider_expert.safetensors")


PREFIX = "search_query: "


def assert_embedded_with_prefix(directory: Path, prefix: str) -> None:
    """The expert's instruction embedding is MiniLM's embedding of `prefix + instruction`, computed here by the
    embedder without a prefix, and the file records the prefix (no key for none)."""
    meta = json.loads((directory / "glider_expert.json").read_text())
    assert meta.get("embedding_prefix", "") == prefix and meta["embedding_model"] == DEFAULT_EMBEDDING_MODEL
    plain = load_embedder(DEFAULT_EMBEDDING_MODEL)
    expected = plain.embed([prefix + meta["instruction"]])[0]
    got = load_file(directory / "glider_expert.safetensors")["instruction_embedding"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if prefix:  # the prefix matters
        assert not torch.allclose(plain.embed([meta["instruction"]])[0], expected, atol=1e-3)


def test_describe_with_a_prefix_records_it_and_the_build_takes_it(undescribed, base):
    describe_experts(undescribed, embedder=load_embedder(DEFAULT_EMBEDDING_MODEL, prefix=PREFIX))
    for directory in undescribed:
        assert_embedded_with_prefix(directory, PREFIX)
    glider = GliderT5ForConditionalGeneration.from_experts(base, undescribed, top_k=2)
    assert glider.config.instruction_embedding_prefix == PREFIX
    assert load_config_embedder(glider.config).prefix == PREFIX  # queries are embedded alike

    describe_experts(undescribed, embedder=load_embedder(DEFAULT_EMBEDDING_MODEL))  # again without: the key goes
    for directory in undescribed:
        assert_embedded_with_prefix(directory, "")
    glider = GliderT5ForConditionalGeneration.from_experts(base, undescribed, top_k=2)
    assert glider.config.instruction_embedding_prefix is None


def test_cli_describe_experts_embeds_with_the_prefix(undescribed, capsys):
    assert main(["describe-experts", *map(str, undescribed[:2]), "--embedding-prefix", PREFIX]) == 0
    capsys.readouterr()
    for directory in undescribed[:2]:
        assert_embedded_with_prefix(directory, PREFIX)


# 5. The pipeline

TEXTS = {
    "a": ["abba cab", "a bad cab", "baba"],
    "b": ["deed fed", "feed", "defeed"],
    "c": ["high egg", "hghg", "hedge high"],
}


def test_pipeline_routes_by_the_fitted_descriptors(tmp_path, tokenizer):
    """Instructions point to the wrong letters; the samples to the right ones. The pipeline's top expert per query must
    be the formula's top expert with the fitted descriptors (and differ from the instruction's for some)."""
    embedder = LetterEmbedder()
    base = make_base(seed=2, vocab_size=len(tokenizer))
    names = list(TEXTS)
    dirs = []
    for e, name in enumerate(names):
        misleading = TEXTS[names[(e + 1) % len(names)]][0]
        directory = make_expert(tmp_path, base, name, r=2, seed=e, embedding=embedder.embed([misleading])[0],
                                instruction=misleading)  # fmt: skip
        meta = json.loads((directory / "glider_expert.json").read_text())
        (directory / "glider_expert.json").write_text(json.dumps({**meta, "embedding_model": embedder.model_id}))
        add_samples(directory, embedder.embed(TEXTS[name]))
        dirs.append(directory)
    glider = build(base, dirs, global_routing_scale=100.0)
    pipe = pipeline("text2text-generation", model=glider, tokenizer=tokenizer, instruction_embedder=embedder)
    asked = ["cab abba", "fee deed", "eggs high", "bad hedge"]
    u = embedder.embed(asked)
    fitted = cosines(u, glider.global_router.expert_descriptors)
    instruction = cosines(u, glider.global_router.expert_embeddings)
    top2 = fitted.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 0.05  # each query has a clear winner at alpha 100
    outputs = pipe(asked, return_experts=True, max_new_tokens=3, do_sample=False)
    got = [output[0]["experts"][0]["name"] for output in outputs]
    assert got == [names[i] for i in fitted.argmax(dim=-1)]
    assert got != [names[i] for i in instruction.argmax(dim=-1)]
