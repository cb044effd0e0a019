"""Hostile embedded samples and descriptor settings: each is refused with an error naming the culprit (expert, field,
argument), files stay byte for byte as they were and a model as it was."""

import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file

from benchmarks.glider_mini.library import export_experts
from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.describe import describe_experts
from modeling_glider.training import train_expert
from tests.conftest import EMBED_DIM, make_base, make_expert
from tests.hostile.test_cli import run_failing
from tests.hostile.test_expert_inputs import tree_hashes
from tests.test_descriptors import LetterEmbedder, add_samples

D = EMBED_DIM


@pytest.fixture(scope="module")
def base():
    return make_base(seed=0)


@pytest.fixture
def experts(tmp_path, base):
    """Expert "good" with 4 samples, "plain" with none; both with instruction embeddings."""
    good = make_expert(tmp_path, base, "good", r=2, targets=("q", "wo"), seed=1, embedding=torch.eye(D)[0])
    add_samples(good, torch.eye(D)[:4] + 0.1)
    plain = make_expert(tmp_path, base, "plain", r=2, targets=("q", "wo"), seed=2, embedding=torch.eye(D)[1])
    return good, plain


def state(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_model(model, saved_state, saved_experts) -> None:
    now = model.state_dict()
    assert now.keys() == saved_state.keys() and all(torch.equal(now[k], saved_state[k]) for k in saved_state)
    assert model.config.experts == saved_experts


# Expert files


def one_dimensional(d):
    return torch.ones(D)


def three_dimensional(d):
    return torch.ones(1, 2, D)


def too_wide(d):
    return torch.ones(3, D + 1)


def with_nan(d):
    rows = torch.ones(3, D)
    rows[1, 2] = float("nan")
    return rows


def with_inf(d):
    rows = torch.ones(3, D)
    rows[0, 0] = float("inf")
    return rows


def no_rows(d):
    return torch.ones(0, D)


def a_row_of_zeros(d):
    rows = torch.ones(3, D)
    rows[2] = 0
    return rows


SAMPLE_CASES = [one_dimensional, three_dimensional, too_wide, with_nan, with_inf, no_rows, a_row_of_zeros]


@pytest.mark.parametrize("make_rows", SAMPLE_CASES)
def test_bad_sample_embeddings_are_refused_by_build_and_add_expert(tmp_path, base, experts, make_rows):
    good, plain = experts
    bad = make_expert(tmp_path, base, "bad", r=2, targets=("q",), seed=3, embedding=torch.eye(D)[2])
    tensors = load_file(bad / "glider_expert.safetensors")
    save_file({**tensors, "sample_embeddings": make_rows(D)}, bad / "glider_expert.safetensors")
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)'bad'.*sample_embeddings"):
        GliderT5ForConditionalGeneration.from_experts(base, [good, bad], top_k=1)
    model = GliderT5ForConditionalGeneration.from_experts(base, [good, plain], top_k=1)
    saved_state, saved_experts = state(model), model.config.experts
    with pytest.raises(ValueError, match=r"(?s)'bad'.*sample_embeddings"):
        model.add_expert(bad)
    assert_same_model(model, saved_state, saved_experts)
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("library", ["alone", "with plain"])
def test_samples_without_an_instruction_embedding_are_refused(tmp_path, base, library):
    lonely = make_expert(tmp_path, base, "lonely", r=2, targets=("q",), seed=4)
    add_samples(lonely, torch.ones(2, D))
    others = [make_expert(tmp_path, base, "other", r=2, targets=("q",), seed=5)] if library == "with plain" else []
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)'lonely'.*sample_embeddings.*instruction_embedding"):
        GliderT5ForConditionalGeneration.from_experts(base, [*others, lonely], top_k=1)
    if others:  # a library without global router
        model = GliderT5ForConditionalGeneration.from_experts(base, others, top_k=1)
        saved_state, saved_experts = state(model), model.config.experts
        with pytest.raises(ValueError, match=r"(?s)'lonely'.*instruction_embedding"):
            model.add_expert(lonely)
        assert_same_model(model, saved_state, saved_experts)
    assert tree_hashes(tmp_path) == before


# Saved models whose config.json disagrees with the tensors


@pytest.fixture
def saved(tmp_path, base, experts):
    model = GliderT5ForConditionalGeneration.from_experts(
        base, list(experts), top_k=1, global_routing_descriptor="both"
    )
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def edit_experts(folder, index: int, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["experts"][index].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("value", [-1, True, 1.5, "4", None])
def test_config_samples_of_the_wrong_type_are_refused(saved, value):
    edit_experts(saved, 0, samples=value)
    before = tree_hashes(saved)
    with pytest.raises(ValueError, match=r"Expert 'good': 'samples' must be an integer >= 0"):
        GliderT5ForConditionalGeneration.from_pretrained(saved)
    assert tree_hashes(saved) == before


@pytest.mark.parametrize(
    "changes",
    [
        {0: 3},  # fewer than the rows held
        {1: 1},  # an expert without samples given one
        {0: 5},  # more than the tensor holds
        {0: 0, 1: 0},  # none at all
    ],
    ids=["fewer", "plain-gets-one", "more", "none"],
)
def test_config_samples_that_disagree_with_the_tensor_are_refused(saved, changes):
    config = json.loads((saved / "config.json").read_text())
    config["global_routing_descriptor"] = "instruction"  # so that only the count is wrong
    for index, count in changes.items():
        config["experts"][index]["samples"] = count
    (saved / "config.json").write_text(json.dumps(config))
    before = tree_hashes(saved)
    with pytest.raises(ValueError, match=r"experts\[\*\]\.samples"):
        GliderT5ForConditionalGeneration.from_pretrained(saved)
    assert tree_hashes(saved) == before


def test_a_descriptor_that_needs_samples_on_a_config_with_none_names_the_field(saved):
    for index in (0, 1):
        edit_experts(saved, index, samples=0)  # the config still asks for "both"
    before = tree_hashes(saved)
    with pytest.raises(ValueError, match=r"(?s)global_routing_descriptor.*experts\[\*\]\.samples"):
        GliderT5ForConditionalGeneration.from_pretrained(saved)
    assert tree_hashes(saved) == before


# global_routing_descriptor


DESCRIPTOR_CASES = [
    ({"global_routing_descriptor": "centroid"}, "all", r"global_routing_descriptor must be one of"),
    ({"global_routing_descriptor": None}, "all", r"global_routing_descriptor"),
    ({"global_routing_descriptor": "samples"}, "plain", r"global_routing_descriptor='samples' needs experts with"),
    ({"global_routing_descriptor": "both"}, "plain", r"global_routing_descriptor='both' needs experts with"),
    ({"routing_compatibility": "reference", "global_routing_descriptor": "samples"}, "all", r"routing_compatibility='reference'.*global_routing_descriptor='instruction'"),
]  # fmt: skip


@pytest.mark.parametrize("knobs, library, message", DESCRIPTOR_CASES)
def test_bad_descriptor_settings_are_refused_at_construction(tmp_path, base, experts, knobs, library, message):
    dirs = list(experts) if library == "all" else [experts[1]]
    before = tree_hashes(tmp_path)
    with pytest.raises((ValueError, StrictDataclassError), match=message):  # None: the config's field types are checked
        GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1, **knobs)
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("knobs, library, message", DESCRIPTOR_CASES)
def test_bad_descriptor_settings_are_refused_on_assignment_after_loading(
    tmp_path, base, experts, knobs, library, message
):
    dirs = list(experts) if library == "all" else [experts[1]]
    GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1).save_pretrained(tmp_path / "model")
    before = tree_hashes(tmp_path)
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "model", **knobs)
    model = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "model")
    *valid, (name, value) = knobs.items()
    for other, setting in valid:  # each valid alone
        setattr(model.config, other, setting)
    u = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    logits = model.global_routing_logits(u)
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        setattr(model.config, name, value)
    assert model.config.global_routing_descriptor == "instruction"  # the old value kept
    assert torch.equal(model.global_routing_logits(u), logits)
    assert tree_hashes(tmp_path) == before


def test_reference_mode_refuses_a_samples_model_on_assignment(base, experts):
    model = GliderT5ForConditionalGeneration.from_experts(
        base, list(experts), top_k=1, global_routing_descriptor="samples"
    )
    with pytest.raises(ValueError, match="routing_compatibility='reference'"):
        model.config.routing_compatibility = "reference"
    assert model.config.routing_compatibility == "glider" and model.config.global_routing_descriptor == "samples"


def test_removing_the_last_expert_with_samples_from_a_samples_model_is_refused(base, experts):
    model = GliderT5ForConditionalGeneration.from_experts(
        base, list(experts), top_k=1, global_routing_descriptor="samples"
    )
    saved_state, saved_experts = state(model), model.config.experts
    with pytest.raises(ValueError, match=r"global_routing_descriptor='samples' needs experts with"):
        model.remove_expert("good")
    assert_same_model(model, saved_state, saved_experts)
    for config in (model.encoder.config, model.decoder.config):
        assert config.experts == saved_experts


def test_cli_build_refuses_the_samples_descriptor_for_a_library_without_samples(tmp_path, base, experts, capsys):
    base.save_pretrained(tmp_path / "base")
    capsys.readouterr()
    before = tree_hashes(tmp_path)
    argv = ["build", "--base", str(tmp_path / "base"), "--experts", str(experts[1]), "--out", str(tmp_path / "glider"),
            "--top-k", "1", "--global-routing-descriptor", "samples"]  # fmt: skip
    code, line = run_failing(argv, capsys)
    assert code != 0 and "global_routing_descriptor" in line, line
    assert tree_hashes(tmp_path) == before and not (tmp_path / "glider").exists()


# describe-experts


@pytest.fixture
def described(tmp_path, base):
    root = tmp_path / "experts"
    dirs = [make_expert(root, base, name, r=2, targets=("q",), seed=i, instruction=f"Do {name}.") for i, name in enumerate(["alpha", "beta"])]  # fmt: skip
    describe_experts(dirs, data={"alpha": ["abc", "bcd", "cde"]}, samples=2, embedder=LetterEmbedder())
    return root, dirs


DESCRIBE_CASES = [
    ({"samples": -1, "data": {"alpha": ["x"]}}, r"samples must be an integer >= 0"),
    ({"samples": True, "data": {"alpha": ["x"]}}, r"samples must be an integer >= 0"),
    ({"samples": 1.5, "data": {"alpha": ["x"]}}, r"samples must be an integer >= 0"),
    ({"samples": 2}, r"samples=2 asks for embedded inputs, but no expert's data"),
    ({"embedder": LetterEmbedder("other-letters")}, r"Expert 'alpha'.*sample_embeddings made with 'letter-counts'"),
    ({"samples": 2, "data": {"beta": []}}, r"Expert 'beta'.*no inputs"),
    ({"samples": 2, "data": {"beta": [{"text": "abc"}]}}, r"Expert 'beta'.*'input'"),
    ({"samples": 2, "data": {"beta": ["abc", 7]}}, r"Expert 'beta'.*'input'"),
    ({"samples": 2, "data": {"beta": ["abc", "   "]}}, r"Expert 'beta'.*'input'"),
    ({"embedder": LetterEmbedder(letters="abcdef")}, r"Expert 'alpha'.*8 wide.*6"),
    ({"embedder": LetterEmbedder(prefix="q: ")}, r"Expert 'alpha'.*made with 'letter-counts';.*'letter-counts' with the prefix 'q: '"),
    ({"embedding_prefix": 5}, r"embedding_prefix must be a text, got 5"),
    ({"embedding_prefix": "p: "}, r"embedding_prefix='p: ', but the embedder given puts ''"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, message", DESCRIBE_CASES)
def test_describe_refusals_write_nothing(described, kwargs, message):
    root, dirs = described
    before = tree_hashes(root)
    with pytest.raises(ValueError, match=message):
        describe_experts(dirs, **{"embedder": LetterEmbedder(), **kwargs})
    assert tree_hashes(root) == before


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["--samples", "-1"], "--samples"),
        (["--samples", "2"], "samples=2"),
        (["--samples", "x"], "--samples"),
        (["--embedding-prefix", "q: "], "with the prefix 'q: '"),  # alpha's kept samples were embedded without it
    ],
)
def test_cli_describe_samples_errors_are_one_line(described, capsys, argv, culprit):
    root, dirs = described
    before = tree_hashes(root)
    code, line = run_failing(["describe-experts", *map(str, dirs), *argv], capsys)
    assert code != 0 and culprit in line, line
    assert tree_hashes(root) == before


# Embedding prefixes: experts embedded with different prefixes live in different spaces


def describe_with_prefixes(root, base, prefixes: dict[str, str]) -> list:
    dirs = [make_expert(root, base, name, r=2, targets=("q",), seed=i, instruction=f"Do {name}.") for i, name in enumerate(prefixes)]  # fmt: skip
    for directory, prefix in zip(dirs, prefixes.values()):
        describe_experts([directory], embedder=LetterEmbedder(prefix=prefix))
    return dirs


PREFIX_BUILD_CASES = [
    ({"alpha": "q: ", "beta": ""}, {}, ["different prefixes", "'alpha': 'q: '", "'beta': ''"]),
    ({"alpha": "", "beta": "q: "}, {}, ["different prefixes", "'alpha': ''", "'beta': 'q: '"]),
    ({"alpha": "q: ", "beta": "q: "}, {"instruction_embedding_prefix": "p: "}, ["instruction_embedding_prefix='p: '", "'q: '"]),
    ({"alpha": "q: ", "beta": "q: "}, {"instruction_embedding_prefix": ""}, ["instruction_embedding_prefix=''", "'q: '"]),
    ({"alpha": "q: ", "beta": "q: "}, {"instruction_embedding_prefix": None}, ["instruction_embedding_prefix=None", "'q: '"]),
]  # fmt: skip


@pytest.mark.parametrize("prefixes, kwargs, culprits", PREFIX_BUILD_CASES)
def test_build_refuses_experts_and_keywords_that_disagree_on_the_prefix(tmp_path, base, prefixes, kwargs, culprits):
    dirs = describe_with_prefixes(tmp_path, base, prefixes)
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError) as caught:
        GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1, **kwargs)
    for culprit in culprits:
        assert culprit in str(caught.value), (culprit, str(caught.value))
    assert tree_hashes(tmp_path) == before


def test_build_takes_the_experts_prefix(tmp_path, base):
    dirs = describe_with_prefixes(tmp_path, base, {"alpha": "q: ", "beta": "q: "})
    for kwargs in ({}, {"instruction_embedding_prefix": "q: "}):
        model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1, **kwargs)
        assert model.config.instruction_embedding_prefix == "q: "
    exported = export_experts(model, tmp_path / "exported")  # the library's experts as files keep the prefix
    assert all(json.loads((d / "glider_expert.json").read_text())["embedding_prefix"] == "q: " for d in exported)
    again = GliderT5ForConditionalGeneration.from_experts(base, exported, top_k=1)
    assert again.config.instruction_embedding_prefix == "q: "


@pytest.mark.parametrize("library, added", [("q: ", ""), ("", "q: "), ("q: ", "p: ")])
def test_add_expert_refuses_another_prefix_and_changes_nothing(tmp_path, base, library, added):
    dirs = describe_with_prefixes(tmp_path, base, {"alpha": library, "beta": library, "gamma": added})
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs[:2], top_k=1)
    saved_state, saved_experts = state(model), [dict(e) for e in model.config.experts]
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError) as caught:
        model.add_expert(dirs[2])
    for culprit in ("'gamma'", f"prefix {added!r}", f"library's with {library!r}"):
        assert culprit in str(caught.value), (culprit, str(caught.value))
    assert_same_model(model, saved_state, saved_experts)
    assert model.config.instruction_embedding_prefix == (library or None) and tree_hashes(tmp_path) == before
    describe_experts([dirs[2]], embedder=LetterEmbedder(prefix=library))  # embedded alike: added
    model.add_expert(dirs[2])
    assert model.config.expert_names == ["alpha", "beta", "gamma"]


# train_expert


TRAIN_CASES = [
    (torch.ones(D), torch.ones(D)),
    (torch.ones(2, D + 1), torch.ones(D)),
    (torch.full((2, D), float("nan")), torch.ones(D)),
    (torch.ones(0, D), torch.ones(D)),
    (torch.zeros(2, D), torch.ones(D)),
    (torch.ones(2, D, dtype=torch.long), torch.ones(D)),
    ([[1.0] * D], torch.ones(D)),
    (torch.ones(2, D), None),
]


@pytest.mark.parametrize("rows, embedding", TRAIN_CASES, ids=["rank1", "width", "nan", "no-rows", "zeros", "long", "list", "no-instruction"])  # fmt: skip
def test_train_expert_refuses_bad_sample_embeddings_before_training(tmp_path, base, rows, embedding):
    (tmp_path / "out").mkdir()
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError, match=r"Expert 'words': sample_embeddings"):
        train_expert(base, [{"input": "a", "target": "b"}], tmp_path / "out" / "words", name="words", tokenizer="unused",
                     steps=1, instruction_embedding=embedding, sample_embeddings=rows)  # fmt: skip
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out" / "words").exists()


def test_a_good_library_with_samples_still_builds(base, experts):
    model = GliderT5ForConditionalGeneration.from_experts(
        base, list(experts), top_k=1, global_routing_descriptor="samples"
    )
    assert [e["samples"] for e in model.config.experts] == [4, 0]
