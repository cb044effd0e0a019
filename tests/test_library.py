"""The expert library: add/remove against a build from scratch, Arrow prototypes against an SVD computed here, and the
errors a bad library gets."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.experts import arrow_prototype
from tests.conftest import EMBED_DIM, make_base, make_expert


def inputs(seed=0, batch=2, length=6, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g), torch.randint(2, vocab, (batch, 5), generator=g)


def logits(model, u=None, seed=0):
    ids, dec = inputs(seed)
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits


def assert_same_model(got, expected):
    """Same config, same tensors bit for bit, same logits with and without the global router."""
    saving_metadata = ("_name_or_path", "architectures", "dtype")  # set by save_pretrained / from_pretrained
    config = {k: v for k, v in got.config.to_dict().items() if k not in saving_metadata}
    assert config == {k: v for k, v in expected.config.to_dict().items() if k not in saving_metadata}
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    for key in expected_state:
        assert got_state[key].dtype == expected_state[key].dtype, key
        assert torch.equal(got_state[key], expected_state[key]), key
    u = torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(3)) if expected.global_router else None
    assert torch.equal(logits(got), logits(expected))
    assert torch.equal(logits(got, u), logits(expected, u))


@pytest.fixture
def library(tmp_path):
    """Four experts of different ranks, alphas and module sets; `ffn_only` alone adapts the feed-forward wo."""
    base = make_base(seed=1)
    g = torch.Generator().manual_seed(5)
    emb = lambda: torch.randn(EMBED_DIM, generator=g)  # noqa: E731
    dirs = {
        "wide": make_expert(tmp_path, base, "wide", r=2, lora_alpha=4, seed=1, embedding=emb()),
        "attention": make_expert(
            tmp_path, base, "attention", r=4, targets=("q", "v"), use_rslora=True, seed=2, embedding=emb()
        ),
        "big_rank": make_expert(
            tmp_path, base, "big_rank", r=8, rank_pattern={"k": 3}, layers=[1], seed=3, embedding=emb()
        ),
        "ffn_only": make_expert(tmp_path, base, "ffn_only", r=3, targets=("wi_0", "wo"), seed=4, embedding=emb()),
    }
    return base, dirs


@pytest.mark.parametrize("local_router", ["phatgoose", "arrow"])
def test_add_expert_equals_build_from_scratch(library, tmp_path, local_router):
    base, dirs = library
    kwargs = {"top_k": 2, "global_routing_scale": 3.0, "local_router": local_router}
    model = GliderT5ForConditionalGeneration.from_experts(base, [dirs["wide"], dirs["attention"]], **kwargs)
    before, logits_before = {k: v.clone() for k, v in model.state_dict().items()}, logits(model)
    model.add_expert(dirs["big_rank"])  # the largest rank: the padding of the linears it adapts grows
    model.add_expert(dirs["ffn_only"])  # the first expert of the feed-forward wo
    expected = GliderT5ForConditionalGeneration.from_experts(
        base, [dirs["wide"], dirs["attention"], dirs["big_rank"], dirs["ffn_only"]], **kwargs
    )
    assert_same_model(model, expected)
    assert not torch.allclose(logits(model), logits_before, atol=1e-4)  # the new experts do route
    # the experts already there are untouched, at their unpadded ranks
    k = model.get_submodule("encoder.block.1.layer.0.SelfAttention.k")
    assert k.expert_ids == [0, 2] and k.lora_A.shape == (2, 3, 32)
    assert torch.equal(k.lora_A[0, :2], before["encoder.block.1.layer.0.SelfAttention.k.lora_A"][0])

    model.save_pretrained(tmp_path / "saved")
    reloaded = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert_same_model(reloaded, expected)


@pytest.mark.parametrize("removed", ["big_rank", "wide", "ffn_only"])
def test_remove_expert_equals_build_from_scratch(library, tmp_path, removed):
    base, dirs = library
    model = GliderT5ForConditionalGeneration.from_experts(base, list(dirs.values()), top_k=3, global_routing_scale=3.0)
    model.remove_expert(removed)  # big_rank: padding shrinks; wide: later ids move up; ffn_only: wo loses all experts
    expected = GliderT5ForConditionalGeneration.from_experts(
        base, [d for name, d in dirs.items() if name != removed], top_k=3, global_routing_scale=3.0
    )
    assert_same_model(model, expected)
    model.save_pretrained(tmp_path / "saved")
    assert_same_model(GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "saved"), expected)


def test_remove_then_add_back_restores_the_library(library):
    base, dirs = library
    names = ["wide", "attention", "ffn_only", "big_rank"]
    expected = GliderT5ForConditionalGeneration.from_experts(base, [dirs[n] for n in names], top_k=2)
    model = GliderT5ForConditionalGeneration.from_experts(base, [dirs[n] for n in names[:2] + names[3:]], top_k=2)
    model.remove_expert("big_rank")
    model.add_expert(dirs["ffn_only"])
    model.add_expert(dirs["big_rank"])
    assert_same_model(model, expected)


def test_add_remove_errors_leave_the_model_unchanged(library, tmp_path):
    base, dirs = library
    model = GliderT5ForConditionalGeneration.from_experts(base, [dirs["wide"], dirs["attention"]], top_k=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()

    other_base = make_base(seed=1, gated=False)  # relu T5: `wi`, not `wi_0`/`wi_1`
    cases = [
        (dirs["wide"], "already has an expert named 'wide'"),
        (make_expert(tmp_path / "o", other_base, "other_base", seed=9, embedding=torch.ones(EMBED_DIM)), "other_base"),
        (make_expert(tmp_path / "n", base, "no_embedding", seed=9), "has no instruction_embedding"),
        (make_expert(tmp_path / "w", base, "wide_embedding", seed=9, embedding=torch.ones(3)), "3 values"),
        (
            make_expert(tmp_path / "g", base, "no_gates", seed=9, gates=False, embedding=torch.ones(EMBED_DIM)),
            "train-gates",
        ),
        (tmp_path / "missing", "missing"),
    ]
    for directory, message in cases:
        with pytest.raises((ValueError, FileNotFoundError, OSError), match=message):
            model.add_expert(directory)
    with pytest.raises(ValueError, match=r"No expert named 'nope'.*\['wide', 'attention'\]"):
        model.remove_expert("nope")
    with pytest.raises(ValueError, match="fewer than router_top_k = 2"):
        model.remove_expert("wide")

    assert model.config.to_dict() == config
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    single = GliderT5ForConditionalGeneration.from_experts(base, [dirs["wide"]], top_k=1)
    with pytest.raises(ValueError, match="only expert"):
        single.remove_expert("wide")


def test_add_expert_warns_on_another_base_name(library, tmp_path):
    base, dirs = library
    model = GliderT5ForConditionalGeneration.from_experts(base, [dirs["wide"]], top_k=1)
    model.config.base_model_name_or_path = "org/t5-small"
    adapter_config = json.loads((dirs["attention"] / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "org/t5-large"
    (dirs["attention"] / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.warns(UserWarning, match=r"'attention'.*t5-large.*t5-small"):
        model.add_expert(dirs["attention"])


def test_arrow_prototypes_equal_an_svd_computed_here():
    g = torch.Generator().manual_seed(0)
    for r, d_in, d_out in [(4, 32, 48), (1, 16, 8), (8, 20, 30)]:
        A, B = (
            torch.randn(r, d_in, generator=g, dtype=torch.float64),
            torch.randn(d_out, r, generator=g, dtype=torch.float64),
        )
        _, S, Vh = torch.linalg.svd(B @ A)  # the full d_out x d_in product, as the definition says
        expected = Vh[0]
        got = arrow_prototype(A.float(), B.float()).double()
        assert abs(got.norm() - 1) < 1e-5
        # equal up to the sign, which is fixed: the largest-magnitude entry is positive
        torch.testing.assert_close(got, expected * expected[expected.abs().argmax()].sign(), atol=1e-5, rtol=0)
        assert got[got.abs().argmax()] > 0
        # it is the direction B A stretches most
        torch.testing.assert_close((B @ A @ got).norm(), S[0], atol=1e-4, rtol=1e-5)


def test_arrow_routing_uses_the_svd_prototypes(library):
    base, dirs = library
    model = GliderT5ForConditionalGeneration.from_experts(
        base, [dirs["wide"], dirs["attention"]], top_k=1, local_router="arrow", arrow_temperature=0.5
    )
    adapter = load_file(dirs["attention"] / "adapter_model.safetensors")
    path = "decoder.block.0.layer.0.SelfAttention.q"
    A, B = (adapter[f"base_model.model.{path}.lora_{m}.weight"].double() for m in "AB")
    v = torch.linalg.svd(B @ A).Vh[0]
    linear = model.get_submodule(path)
    assert linear.expert_ids == [0, 1]
    torch.testing.assert_close(linear.router_gate[1].double().abs(), v.abs(), atol=1e-5, rtol=0)
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(1))
    weights, indices = linear.route(x, None)
    scores = (x.double() @ torch.stack([linear.router_gate[0].double(), v]).T).abs() / 0.5  # Arrow's |v.x| / T
    assert ((scores[..., 0] - scores[..., 1]).abs() > 1e-3).all()  # no near tie: fp32 routing picks the same expert
    assert torch.equal(indices[..., 0], scores.argmax(-1))


# Bad libraries: each error names the expert (or file) at fault.


def test_corrupt_and_truncated_safetensors_name_the_expert(library, tmp_path):
    base, dirs = library
    truncated = dirs["wide"] / "adapter_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"Expert 'wide'.*adapter_model.safetensors.*corrupt or truncated"):
        GliderT5ForConditionalGeneration.from_experts(base, [dirs["wide"], dirs["attention"]], top_k=1)
    (dirs["attention"] / "glider_expert.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"Expert 'attention'.*glider_expert.safetensors.*corrupt or truncated"):
        GliderT5ForConditionalGeneration.from_experts(base, [dirs["attention"]], top_k=1)


@pytest.mark.parametrize(
    "file, key_part", [("adapter_model.safetensors", "lora_B"), ("glider_expert.safetensors", "gate.")]
)
def test_nan_weights_name_the_expert_and_tensor(library, file, key_part):
    base, dirs = library
    tensors = load_file(dirs["ffn_only"] / file)
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key][0] = float("nan")
    save_file(tensors, dirs["ffn_only"] / file)
    with pytest.raises(ValueError, match=rf"Expert 'ffn_only'.*{key_part}.*NaN"):
        GliderT5ForConditionalGeneration.from_experts(base, [dirs["wide"], dirs["ffn_only"]], top_k=1)


def test_mixed_base_names_warn_and_name_the_experts(library):
    base, dirs = library
    for name, claimed in [("wide", "org/t5-a"), ("attention", "org/t5-b")]:
        adapter_config = json.loads((dirs[name] / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = claimed
        (dirs[name] / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.warns(UserWarning, match=r"different base models.*'wide': 'org/t5-a'.*'attention': 'org/t5-b'"):
        GliderT5ForConditionalGeneration.from_experts(base, [dirs["wide"], dirs["attention"]], top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same claimed base everywhere: silent
        GliderT5ForConditionalGeneration.from_experts(base, [dirs["wide"]], top_k=1)
