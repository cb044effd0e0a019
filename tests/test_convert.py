"""The converter against the same experts as PEFT adapters: files in GLIDER's `<task>_best.pt` and Phatgoose's
concatenated formats are written here from PEFT-saved experts, converted, and must build the same GliderT5."""

import argparse
import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.convert import convert_checkpoints
from tests.conftest import EMBED_DIM, make_base, make_expert

PREFIX = "base_model.model."


def expert_tensors(directory):
    """module path -> (A, B, gate) of an expert directory, read with safetensors alone."""
    adapter = load_file(directory / "adapter_model.safetensors")
    extra = load_file(directory / "glider_expert.safetensors")
    return {
        key[len(PREFIX) : -len(".lora_A.weight")]: (
            A,
            adapter[key.replace("lora_A", "lora_B")],
            extra[f"gate.{key[len(PREFIX) : -len('.lora_A.weight')]}"],
        )
        for key, A in adapter.items()
        if key.endswith(".lora_A.weight")
    }


def glider_best_pt(directory, base, path):
    """A GLIDER `<task>_best.pt`: the PEFT model's state dict with LoRA, gates and the base weights."""
    state = {}
    for module_path, (A, B, gate) in expert_tensors(directory).items():
        state[f"{PREFIX}{module_path}.lora_A.default.weight"] = A.clone()
        state[f"{PREFIX}{module_path}.lora_B.default.weight"] = B.clone()
        state[f"{PREFIX}{module_path}.lora_gate.default"] = gate.clone()
        state[f"{PREFIX}{module_path}.base_layer.weight"] = base.get_submodule(module_path).weight.detach().clone()
    state[f"{PREFIX}shared.weight"] = base.shared.weight.detach().clone()
    torch.save(state, path)


def phatgoose_checkpoint(directories, base, path):
    """Phatgoose's concatenated format: expert i as `..._addons.expert_lora.layer1__i` (A^T) and so on."""
    state = {"encoder.embed_tokens.weight": base.shared.weight.detach().clone()}
    for index, directory in enumerate(directories):
        for module_path, (A, B, gate) in expert_tensors(directory).items():
            state[f"{module_path}._addons.expert_lora.layer1__{index}"] = A.T.clone()
            state[f"{module_path}._addons.expert_lora.layer2__{index}"] = B.T.clone()
            state[f"{module_path}._addons.router.expert_embeddings__{index}"] = gate.clone()
    torch.save(state, path)


@pytest.fixture
def peft_library(tmp_path):
    """Three PEFT-saved experts with GLIDER's 1/r scaling (lora_alpha=1), different ranks and module sets."""
    base = make_base(seed=2)
    g = torch.Generator().manual_seed(0)
    embeddings = {name: torch.randn(EMBED_DIM, generator=g) for name in ("p3paws", "p3qqp", "p3agnews")}
    instructions = {"p3paws": "Decide if two sentences are paraphrases.", "p3qqp": "Are the questions duplicates?"}
    common = {"lora_alpha": 1}
    dirs = [
        make_expert(tmp_path / "peft", base, "p3paws", r=4, seed=1, embedding=embeddings["p3paws"],
                    instruction=instructions["p3paws"], **common),
        make_expert(tmp_path / "peft", base, "p3qqp", r=2, seed=2, targets=("q", "v", "wo"),
                    embedding=embeddings["p3qqp"], instruction=instructions["p3qqp"], **common),
        make_expert(tmp_path / "peft", base, "p3agnews", r=4, rank_pattern={"k": 3}, seed=3,
                    embedding=embeddings["p3agnews"], instruction="First.", **common),
    ]  # fmt: skip
    torch.save(embeddings, tmp_path / "nomic_instruction_embedding.pt")
    (tmp_path / "instructions.json").write_text(json.dumps({**instructions, "p3agnews": ["First.", "Second."]}))
    return base, dirs


def assert_same_glider(base, converted, originals, **kwargs):
    got = GliderT5ForConditionalGeneration.from_experts(base, converted, top_k=2, global_routing_scale=2.0, **kwargs)
    expected = GliderT5ForConditionalGeneration.from_experts(
        base, originals, top_k=2, global_routing_scale=2.0, **kwargs
    )
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    assert all(torch.equal(got_state[k], expected_state[k]) for k in expected_state)
    g = torch.Generator().manual_seed(4)
    ids, dec = torch.randint(2, 64, (2, 7), generator=g), torch.randint(2, 64, (2, 4), generator=g)
    u = torch.randn(2, EMBED_DIM, generator=g)
    with torch.no_grad():
        for embedding in (None, u):
            assert torch.equal(
                got(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=embedding).logits,
                expected(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=embedding).logits,
            )
    for entry, reference in zip(got.config.experts, expected.config.experts):
        for key in ("name", "instruction", "target_modules", "use_rslora"):
            assert entry[key] == reference[key], key
    return got


@pytest.mark.parametrize("with_base", [False, True])
def test_glider_best_pt_converts_to_the_same_experts(peft_library, tmp_path, with_base):
    base, originals = peft_library
    for directory in originals:
        glider_best_pt(directory, base, tmp_path / f"{directory.name}_best.pt")
    converted = convert_checkpoints(
        [tmp_path / "p3paws_best.pt", tmp_path / "p3qqp_best.pt", tmp_path / "p3agnews_best.pt"],
        tmp_path / "converted",
        embeddings=tmp_path / "nomic_instruction_embedding.pt",
        instructions=tmp_path / "instructions.json",
        base=base if with_base else None,
    )
    assert [d.name for d in converted] == ["p3paws", "p3qqp", "p3agnews"]
    model = assert_same_glider(base, converted, originals)
    assert model.config.experts[2]["instruction"] == "First."

    # each converted adapter is a plain PEFT LoRA adapter, equal to the original under PEFT itself
    adapter_config = json.loads((converted[1] / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["lora_alpha"] == 1
    if with_base:
        assert sorted(adapter_config["target_modules"]) == ["q", "v", "wo"]
    ids = torch.randint(2, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    dec = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        for got, original in zip(converted, originals):
            a = PeftModel.from_pretrained(copy.deepcopy(base), got)(input_ids=ids, decoder_input_ids=dec).logits
            b = PeftModel.from_pretrained(copy.deepcopy(base), original)(input_ids=ids, decoder_input_ids=dec).logits
            assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == ["p3agnews", "p3paws", "p3qqp"]


def test_a_folder_of_best_pt_files_converts_in_name_order(peft_library, tmp_path):
    base, originals = peft_library
    (tmp_path / "released").mkdir()
    for directory in originals:
        glider_best_pt(directory, base, tmp_path / "released" / f"{directory.name}_best.pt")
    converted = convert_checkpoints(
        tmp_path / "released",
        tmp_path / "out",
        embeddings=tmp_path / "nomic_instruction_embedding.pt",
        instructions=tmp_path / "instructions.json",
    )
    assert [d.name for d in converted] == ["p3agnews", "p3paws", "p3qqp"]
    assert_same_glider(base, converted, sorted(originals))


def test_phatgoose_checkpoint_converts_to_the_same_experts(peft_library, tmp_path):
    base, originals = peft_library
    phatgoose_checkpoint(originals, base, tmp_path / "phatgoose.pt")
    converted = convert_checkpoints(
        tmp_path / "phatgoose.pt",
        tmp_path / "converted",
        names=["p3paws", "p3qqp", "p3agnews"],
        embeddings=tmp_path / "nomic_instruction_embedding.pt",
        instructions={**json.loads((tmp_path / "instructions.json").read_text()), "p3agnews": "First."},
    )
    assert_same_glider(base, converted, originals)


def test_gateless_conversion_builds_with_arrow_and_truncates_embeddings(peft_library, tmp_path):
    base, originals = peft_library
    for directory in originals:
        glider_best_pt(directory, base, tmp_path / f"{directory.name}_best.pt")
    converted = convert_checkpoints(
        sorted(tmp_path.glob("*_best.pt")), tmp_path / "converted", gates=False,
        embeddings=tmp_path / "nomic_instruction_embedding.pt", embedding_dim=5, embedding_model="nomic-embed",
    )  # fmt: skip
    tensors = load_file(converted[0] / "glider_expert.safetensors")
    assert list(tensors) == ["instruction_embedding"]
    torch.testing.assert_close(
        tensors["instruction_embedding"], torch.load(tmp_path / "nomic_instruction_embedding.pt")[converted[0].name][:5]
    )
    model = GliderT5ForConditionalGeneration.from_experts(base, converted, top_k=1, local_router="arrow")
    assert model.config.instruction_embedding_dim == 5 and model.config.instruction_embedding_model == "nomic-embed"
    with pytest.raises(ValueError, match="train-gates"):
        GliderT5ForConditionalGeneration.from_experts(base, converted, top_k=1)


# Bad input gets an error that names the culprit, and no expert folder appears.


def test_converter_errors(peft_library, tmp_path):
    base, originals = peft_library
    glider_best_pt(originals[0], base, tmp_path / "p3paws_best.pt")
    good = tmp_path / "p3paws_best.pt"
    state = torch.load(good, weights_only=True)

    def variant(name, change):
        changed = copy.copy(state)
        change(changed)
        torch.save(changed, tmp_path / name)
        return tmp_path / name

    a_key = next(k for k in state if ".lora_A." in k)
    truncated = tmp_path / "truncated_best.pt"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    pickled = tmp_path / "pickled_best.pt"
    torch.save({"args": argparse.Namespace(lr=1)}, pickled)
    torch.save([1, 2], tmp_path / "not_a_dict.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "empty.pt")
    nan = variant("nan_best.pt", lambda s: s.__setitem__(a_key, torch.full_like(s[a_key], float("nan"))))
    no_b = variant("no_b_best.pt", lambda s: s.pop(a_key.replace("lora_A", "lora_B")))
    no_gate = variant("no_gate_best.pt", lambda s: s.pop(a_key.replace("lora_A.default.weight", "lora_gate.default")))
    two_adapters = variant("two_best.pt", lambda s: s.__setitem__(a_key.replace("default", "other"), s[a_key]))
    dora = variant("dora_best.pt", lambda s: s.__setitem__(a_key.replace("lora_A", "lora_magnitude_vector"), s[a_key]))
    other_base = make_base(seed=2, gated=False)

    cases = [
        ([tmp_path / "missing_best.pt"], {}, FileNotFoundError, "missing_best.pt: no such file"),
        ([tmp_path / "empty_folder"], {}, FileNotFoundError, "no such file or folder"),
        ([truncated], {}, ValueError, "truncated_best.pt: not a readable tensor file"),
        ([pickled], {}, ValueError, "pickled_best.pt: not a readable tensor file.*pickled objects"),
        ([tmp_path / "not_a_dict.pt"], {}, ValueError, "expected a state dict"),
        ([tmp_path / "empty.pt"], {}, ValueError, "empty.pt holds no LoRA weights"),
        ([nan], {}, ValueError, r"Expert 'nan'.*holds NaN"),
        ([no_b], {}, ValueError, r"Expert 'no_b'.*has only \['A', 'gate'\]"),
        ([no_gate], {}, ValueError, r"Expert 'no_gate'.*no gate for .*--no-gates"),
        ([two_adapters], {}, ValueError, r"several adapters \['default', 'other'\]"),
        ([dora], {}, ValueError, "unsupported entry .*lora_magnitude_vector"),
        ([good], {"base": other_base}, ValueError, r"Expert 'p3paws'.*not a linear of the base"),
        ([good, good], {}, ValueError, "'p3paws' occurs twice"),
        ([good], {"names": ["a", "b"]}, ValueError, "2 names were given for 1 experts"),
        ([good, good], {"names": ["a"]}, ValueError, "too few"),
        ([good], {"embeddings": tmp_path / "not_a_dict.pt"}, ValueError, r"expected a dict \{task: tensor\}"),
        ([good], {"names": ["p3unknown"], "embeddings": tmp_path / "nomic_instruction_embedding.pt"}, ValueError,
         r"no entry for 'p3unknown'; some entries: \['p3agnews'"),
        ([good], {"instructions": tmp_path / "nope.json"}, FileNotFoundError, "nope.json"),
        ([good], {"embedding_dim": 0}, ValueError, "embedding_dim must be an integer >= 1"),
    ]  # fmt: skip
    for checkpoints, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            convert_checkpoints(checkpoints, tmp_path / "out", **kwargs)
        assert not list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else True

    # an error in the second file leaves no expert from the first either; an existing expert folder is refused
    with pytest.raises(ValueError, match="Expert 'nan'"):
        convert_checkpoints([good, nan], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nor its staging folder
    convert_checkpoints([good], tmp_path / "out")
    with pytest.raises(FileExistsError, match="'p3paws'.*already exists"):
        convert_checkpoints([good], tmp_path / "out")


# The other formats the authors' code writes or reads.


def molora_state_dict(directories, base, path, normalise_gates=True):
    """The authors' gathered MoLoRA model: expert i as `....lora_experts.default.<i>.lora_A.weight`, all gates as the
    rows of `....lora_gate.default.weight` [E, d_in] (layer-normed, as their gather step leaves them), base weights."""
    state = {f"{PREFIX}shared.weight": base.shared.weight.detach().clone()}
    per_expert = [expert_tensors(d) for d in directories]
    for module_path in per_expert[0]:
        for index, tensors in enumerate(per_expert):
            A, B, _ = tensors[module_path]
            state[f"{PREFIX}{module_path}.lora_experts.default.{index}.lora_A.weight"] = A.clone()
            state[f"{PREFIX}{module_path}.lora_experts.default.{index}.lora_B.weight"] = B.clone()
        gates = torch.stack([tensors[module_path][2] for tensors in per_expert])
        if normalise_gates:
            gates = torch.nn.functional.layer_norm(gates, gates.shape[-1:])
        state[f"{PREFIX}{module_path}.lora_gate.default.weight"] = gates
        state[f"{PREFIX}{module_path}.weight"] = base.get_submodule(module_path).weight.detach().clone()
    torch.save(state, path)


def phatgoose_expert_checkpoint(directory, base, path, router_key=False, output_gate=False):
    """One expert's Phatgoose training checkpoint: `__0` LoRA keys and its gate as `expert_lora.expert_input_gate`."""
    state = {
        "encoder.embed_tokens.weight": base.shared.weight.detach().clone(),
        "decoder.embed_tokens.weight": base.shared.weight.detach().clone(),
    }
    for module_path, (A, B, gate) in expert_tensors(directory).items():
        state[f"{module_path}._addons.expert_lora.layer1__0"] = A.T.clone()
        state[f"{module_path}._addons.expert_lora.layer2__0"] = B.T.clone()
        state[f"{module_path}._addons.expert_lora.expert_input_gate"] = gate.clone()
        if router_key:
            state[f"{module_path}._addons.router.expert_embeddings__0"] = gate.clone()
        if output_gate:
            state[f"{module_path}._addons.expert_lora.expert_output_gate"] = torch.ones(B.shape[0])
    torch.save(state, path)


def same_experts(base, converted, originals, kwargs=None):
    """Same LoRA tensors and instructions, and the same outputs up to fp32 rounding (gates may be normalised twice)."""
    kwargs = {"top_k": 2, "global_routing_scale": 2.0, **(kwargs or {})}
    got = GliderT5ForConditionalGeneration.from_experts(base, converted, **kwargs)
    expected = GliderT5ForConditionalGeneration.from_experts(base, originals, **kwargs)
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    for key in expected_state:
        if not key.endswith("router_gate"):
            assert torch.equal(got_state[key], expected_state[key]), key
    g = torch.Generator().manual_seed(4)
    ids, dec = torch.randint(2, 64, (2, 7), generator=g), torch.randint(2, 64, (2, 4), generator=g)
    with torch.no_grad():
        for u in (None, torch.randn(2, EMBED_DIM, generator=g)):
            want = expected(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
            torch.testing.assert_close(
                got(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits,
                want, rtol=1e-5, atol=1e-5 * float(want.abs().max()),
            )  # fmt: skip
    return got


@pytest.mark.parametrize("normalise_gates", [True, False])
def test_molora_state_dict_converts_to_the_same_experts(peft_library, tmp_path, normalise_gates):
    base, originals = peft_library
    same_shape = originals[:1] + [
        make_expert(tmp_path / "peft", base, name, r=4, seed=seed, lora_alpha=1, embedding=torch.randn(EMBED_DIM))
        for name, seed in (("p3wiqa", 7), ("p3dream", 8))
    ]  # a MoLoRA model adapts the same linears with the same rank in every expert
    molora_state_dict(same_shape, base, tmp_path / "molora.pt", normalise_gates)
    converted = convert_checkpoints(tmp_path / "molora.pt", tmp_path / "converted")
    assert [d.name for d in converted] == ["molora_0", "molora_1", "molora_2"]
    table = {d.name: load_file(d / "glider_expert.safetensors")["instruction_embedding"] for d in same_shape}
    torch.save(table, tmp_path / "router_embeddings.pt")
    converted = convert_checkpoints(
        tmp_path / "molora.pt", tmp_path / "named", names=["p3paws", "p3wiqa", "p3dream"],
        embeddings=tmp_path / "router_embeddings.pt", instructions={"p3paws": "Decide if two sentences are paraphrases."},
    )  # fmt: skip
    same_experts(base, converted, same_shape)
    for directory, original in zip(converted, same_shape):
        got, want = expert_tensors(directory), expert_tensors(original)
        assert got.keys() == want.keys()
        for module_path, (A, B, gate) in want.items():
            assert torch.equal(got[module_path][0], A) and torch.equal(got[module_path][1], B)
            layer_norm = torch.nn.functional.layer_norm
            torch.testing.assert_close(layer_norm(got[module_path][2], gate.shape), layer_norm(gate, gate.shape))


def test_phatgoose_expert_files_with_input_gates_convert(peft_library, tmp_path):
    base, originals = peft_library
    phatgoose_expert_checkpoint(originals[0], base, tmp_path / "p3paws.pt", output_gate=True)
    phatgoose_expert_checkpoint(originals[1], base, tmp_path / "p3qqp.pt", router_key=True)
    phatgoose_expert_checkpoint(originals[2], base, tmp_path / "p3agnews.pt")
    converted = convert_checkpoints(
        [tmp_path / "p3paws.pt", tmp_path / "p3qqp.pt", tmp_path / "p3agnews.pt"], tmp_path / "converted",
        names=["p3paws", "p3qqp", "p3agnews"], embeddings=tmp_path / "nomic_instruction_embedding.pt",
        instructions={**json.loads((tmp_path / "instructions.json").read_text()), "p3agnews": "First."},
    )  # fmt: skip
    assert_same_glider(base, converted, originals)


def test_phatgoose_checkpoint_without_gates_and_instructions_in_a_torch_file(peft_library, tmp_path):
    base, originals = peft_library
    phatgoose_checkpoint(originals, base, tmp_path / "phatgoose.pt")
    state = torch.load(tmp_path / "phatgoose.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if "expert_embeddings" not in k}, tmp_path / "gateless.pt")
    instructions = {"p3paws": "Paraphrase?", "p3qqp": ["Duplicate?", "Other."], "p3agnews": "Topic?"}
    torch.save(instructions, tmp_path / "instructions.pt")
    names = ["p3paws", "p3qqp", "p3agnews"]
    with pytest.raises(ValueError, match=r"Expert 'p3paws' .*gateless.pt.*no gate for .*--no-gates"):
        convert_checkpoints(tmp_path / "gateless.pt", tmp_path / "refused", names=names)
    assert not (tmp_path / "refused").exists()
    converted = convert_checkpoints(
        tmp_path / "gateless.pt", tmp_path / "converted", names=names, gates=False,
        instructions=tmp_path / "instructions.pt", embeddings=tmp_path / "nomic_instruction_embedding.pt",
    )  # fmt: skip
    got = GliderT5ForConditionalGeneration.from_experts(base, converted, top_k=2, local_router="arrow")
    expected = GliderT5ForConditionalGeneration.from_experts(base, originals, top_k=2, local_router="arrow")
    assert [e["instruction"] for e in got.config.experts] == ["Paraphrase?", "Duplicate?", "Topic?"]
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert all(torch.equal(got_state[k], expected_state[k]) for k in expected_state)


def test_new_formats_refuse_what_they_cannot_convert(peft_library, tmp_path):
    import hashlib

    base, originals = peft_library
    molora_state_dict(originals[:1] * 2, base, tmp_path / "molora.pt")
    state = torch.load(tmp_path / "molora.pt", weights_only=True)
    gate_key = next(k for k in state if k.endswith("lora_gate.default.weight"))
    torch.save({**state, gate_key: state[gate_key][:1]}, tmp_path / "short_gates.pt")
    torch.save({**state, gate_key.replace("default", "other"): state[gate_key]}, tmp_path / "two_adapters.pt")
    phatgoose_checkpoint(originals[:2], base, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    layer1 = next(k for k in two if k.endswith("layer1__0"))
    input_gate = layer1.replace("layer1__0", "expert_input_gate")
    torch.save({**two, input_gate: torch.ones(two[layer1].shape[0])}, tmp_path / "ambiguous_gate.pt")
    phatgoose_expert_checkpoint(originals[0], base, tmp_path / "one.pt", router_key=True)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    torch.save({**one, input_gate: one[input_gate] + 1}, tmp_path / "disagreeing_gate.pt")
    torch.save({"p3paws": torch.zeros(4), "p3qqp": torch.zeros(5)}, tmp_path / "widths.pt")
    torch.save({"p3paws": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.pt")
    torch.save({"p3paws": torch.zeros(2, 3)}, tmp_path / "matrix.pt")
    torch.save(["text"], tmp_path / "instructions_list.pt")
    cases = [
        ("short_gates.pt", {}, r"short_gates.pt: '.*lora_gate.default.weight' must hold one gate row per expert \[2,"),
        ("two_adapters.pt", {}, r"two_adapters.pt holds several adapters \['default', 'other'\]"),
        ("ambiguous_gate.pt", {}, r"ambiguous_gate.pt: '.*expert_input_gate' is a single expert's gate.*\[0, 1\]"),
        ("disagreeing_gate.pt", {}, r"disagreeing_gate.pt: '.*expert_input_gate' disagrees with the router gate"),
        ("molora.pt", {"embeddings": "widths.pt"}, r"widths.pt: vectors differ in width"),
        ("molora.pt", {"embeddings": "nan.pt"}, r"nan.pt: 'p3paws' holds NaN"),
        ("molora.pt", {"embeddings": "matrix.pt"}, r"matrix.pt: the entry 'p3paws' is not a float vector"),
        ("molora.pt", {"instructions": "instructions_list.pt"}, r"instructions_list.pt: expected a dict"),
    ]  # fmt: skip

    def hashes():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}

    for checkpoint, kwargs, message in cases:
        before = hashes()
        kwargs = {key: tmp_path / value for key, value in kwargs.items()}
        with pytest.raises(ValueError, match=message):
            convert_checkpoints(tmp_path / checkpoint, tmp_path / "out", **kwargs)
        assert hashes() == before and not (tmp_path / "out").exists()
