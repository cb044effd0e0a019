"""The library commands of the `glider` CLI, end to end on files: build (expert folders and plain PEFT adapters),
train-gates, train-expert, convert."""

import hashlib
import json
import shutil

import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.cli import main
from tests.conftest import EMBED_DIM, make_base, make_expert
from tests.test_hub import TOKEN, hub  # noqa: F401  (the loopback Hub fixture of the Hub tests)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_build_from_expert_folders_and_plain_peft_adapters(tmp_path, tokenizer, capsys):
    base = make_base(seed=1)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    expert = make_expert(tmp_path, base, "nli", r=4, seed=1)
    adapter = make_expert(tmp_path, base, "qa_adapter", r=2, targets=("q", "v", "wo"), seed=2, gates=False)
    (adapter / "glider_expert.json").unlink()  # a plain PEFT adapter, as PEFT saves it

    args = ["build", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "glider"), "--top-k", "1"]
    assert main([*args, "--experts", str(expert), str(adapter)]) == 1  # Phatgoose routing needs trained gates
    assert "Expert 'qa_adapter'" in capsys.readouterr().err and not (tmp_path / "glider").exists()

    assert main([*args, "--experts", str(expert), str(adapter), "--local-router", "arrow"]) == 0
    assert "2 experts ['nli', 'qa_adapter']" in capsys.readouterr().out
    assert (tmp_path / "glider" / "tokenizer_config.json").exists()  # the base's tokenizer travels with the model
    built = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "glider")
    assert built.config.experts[1]["source"] == str(adapter)

    reference_adapter = shutil.copytree(adapter, tmp_path / "reference" / "qa_adapter")
    (reference_adapter / "glider_expert.json").write_text(json.dumps({"name": "qa_adapter"}))
    expected = GliderT5ForConditionalGeneration.from_experts(
        base, [expert, reference_adapter], top_k=1, local_router="arrow"
    )
    ids = torch.randint(2, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            built(input_ids=ids, decoder_input_ids=ids[:, :3]).logits,
            expected(input_ids=ids, decoder_input_ids=ids[:, :3]).logits,
        )

    assert main([*args, "--experts", str(expert)]) == 1  # the output folder is taken
    assert "already exists" in capsys.readouterr().err
    assert main([*args[:-4], "--out", str(tmp_path / "other"), "--experts", str(tmp_path / "no" / "such" / "dir")]) == 1
    assert "no/such/dir: no such directory" in capsys.readouterr().err


def test_train_gates_then_build_with_phatgoose_routing(tmp_path, tokenizer, capsys):
    base = make_base(seed=1)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = make_expert(tmp_path, base, "sorting", r=2, seed=2, gates=False)
    (adapter / "glider_expert.json").unlink()
    data = write_jsonl(tmp_path / "sort.jsonl", [{"input": "sort the letters of banana", "target": "aaabnn"}] * 4)

    assert main(["train-gates", "--base", str(tmp_path / "base"), "--expert", str(adapter), "--data", str(data),
                 "--steps", "2", "--batch-size", "2", "--instruction", "Sort letters."]) == 0  # fmt: skip
    assert "Wrote Phatgoose gates" in capsys.readouterr().out
    assert json.loads((adapter / "glider_expert.json").read_text()) == {
        "name": "sorting",
        "instruction": "Sort letters.",
        "weights_sha256": hashlib.sha256((adapter / "glider_expert.safetensors").read_bytes()).hexdigest(),
    }
    assert len(load_file(adapter / "glider_expert.safetensors")) == 36  # every linear of the gated tiny T5

    assert main(["build", "--base", str(tmp_path / "base"), "--experts", str(adapter), "--out", str(tmp_path / "g"),
                 "--top-k", "1"]) == 0  # fmt: skip
    assert main(["train-gates", "--base", str(tmp_path / "base"), "--expert", str(adapter), "--data",
                 str(tmp_path / "none.jsonl")]) == 1  # fmt: skip
    assert "none.jsonl: no such file" in capsys.readouterr().err


def test_train_expert_and_convert_commands(tmp_path, tokenizer, capsys):
    base = make_base(seed=1)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = write_jsonl(tmp_path / "upper.jsonl", [{"input": "uppercase the word cherry", "target": "CHERRY"}] * 4)
    assert main(["train-expert", "--base", str(tmp_path / "base"), "--data", str(data), "--out",
                 str(tmp_path / "upper"), "--name", "upper", "--r", "2", "--target-modules", "q", "v", "--steps", "2",
                 "--gate-steps", "2", "--batch-size", "2"]) == 0  # fmt: skip
    expert = tmp_path / "upper"
    assert json.loads((expert / "glider_expert.json").read_text())["name"] == "upper"
    assert (
        len(load_file(expert / "glider_expert.safetensors")) == 12
    )  # q, v: 2 encoder blocks, 2 x 2 decoder attentions
    assert "Wrote expert 'upper'" in capsys.readouterr().out

    # the same expert as a GLIDER <task>_best.pt, converted back
    adapter, gates = load_file(expert / "adapter_model.safetensors"), load_file(expert / "glider_expert.safetensors")
    state = {key.replace(".weight", ".default.weight"): value for key, value in adapter.items()}
    state |= {f"base_model.model.{key[5:]}.lora_gate.default": value for key, value in gates.items()}
    torch.save(state, tmp_path / "upper_best.pt")
    torch.save({"upper": torch.ones(EMBED_DIM)}, tmp_path / "embeddings.pt")
    assert main(["convert", str(tmp_path / "upper_best.pt"), "--out", str(tmp_path / "converted"),
                 "--embeddings", str(tmp_path / "embeddings.pt"), "--base", str(tmp_path / "base")]) == 0  # fmt: skip
    assert "Converted 1 experts" in capsys.readouterr().out
    converted = tmp_path / "converted" / "upper"
    assert sorted(json.loads((converted / "adapter_config.json").read_text())["target_modules"]) == ["q", "v"]
    ids = torch.randint(2, 60, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = GliderT5ForConditionalGeneration.from_experts(base, [converted], top_k=1)(
            input_ids=ids, decoder_input_ids=ids
        )
        expected = GliderT5ForConditionalGeneration.from_experts(base, [expert], top_k=1)(
            input_ids=ids, decoder_input_ids=ids
        )
    assert torch.equal(got.logits, expected.logits)
    assert main(["convert", str(tmp_path / "upper_best.pt"), "--out", str(tmp_path / "converted")]) == 1
    assert "'upper'" in capsys.readouterr().err


def test_build_and_add_expert_from_hub_repos(hub, tmp_path, tokenizer, capsys):  # noqa: F811
    """Experts and plain PEFT adapters as repos on the loopback Hub of tests/hub_server.py."""
    base = make_base(seed=1)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    full = make_expert(tmp_path, base, "full", r=2, seed=1)
    plain = make_expert(tmp_path, base, "plain", r=4, targets=("q", "wo"), seed=2, gates=False)
    (plain / "glider_expert.json").unlink()
    api = HfApi(endpoint=hub.url, token=TOKEN)
    for directory, repo_id in [(full, "org/full-expert"), (plain, "org/plain-adapter")]:
        api.create_repo(repo_id)
        api.upload_folder(folder_path=directory, repo_id=repo_id)

    assert main(["build", "--base", str(tmp_path / "base"), "--experts", "org/full-expert", "org/plain-adapter",
                 "--out", str(tmp_path / "glider"), "--local-router", "arrow", "--top-k", "1"]) == 0  # fmt: skip
    built = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "glider")
    assert built.config.expert_names == ["full", "plain-adapter"]
    assert [e["source"] for e in built.config.experts] == ["org/full-expert", "org/plain-adapter"]

    model = GliderT5ForConditionalGeneration.from_experts(base, [plain_as_expert(plain, tmp_path)], top_k=1)
    model.add_expert("org/full-expert")
    expected = GliderT5ForConditionalGeneration.from_experts(
        base, [plain_as_expert(plain, tmp_path), "org/full-expert"], top_k=1
    )
    assert model.config.to_dict() == expected.config.to_dict()
    ids = torch.randint(2, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, decoder_input_ids=ids).logits, expected(input_ids=ids, decoder_input_ids=ids).logits
        )
    assert main(["build", "--base", str(tmp_path / "base"), "--experts", "org/no-such-expert", "--out",
                 str(tmp_path / "other")]) == 1  # fmt: skip
    assert "'org/no-such-expert'" in capsys.readouterr().err


def plain_as_expert(adapter, root):
    """The plain adapter with gates and a name, as an expert folder (written here with safetensors)."""
    directory = root / "plain_expert"
    if not directory.exists():
        shutil.copytree(adapter, directory)
        adapter_weights = load_file(directory / "adapter_model.safetensors")
        gates = {
            f"gate.{key[len('base_model.model.') : -len('.lora_A.weight')]}": torch.ones(A.shape[1])
            for key, A in adapter_weights.items()
            if key.endswith("lora_A.weight")
        }
        save_file(gates, directory / "glider_expert.safetensors")
        (directory / "glider_expert.json").write_text(json.dumps({"name": "plain"}))
    return directory


def test_train_expert_embeds_its_instruction_and_samples(tmp_path, tokenizer, capsys):
    from modeling_glider.embedding import DEFAULT_EMBEDDING_MODEL, load_embedder

    base = make_base(seed=1)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    capsys.readouterr()  # the save's progress bar
    words = ["cherry", "apple", "plum", "pear", "fig"]
    data = write_jsonl(
        tmp_path / "upper.jsonl", [{"input": f"uppercase the word {w}", "target": w.upper()} for w in words]
    )
    command = ["train-expert", "--base", str(tmp_path / "base"), "--data", str(data), "--name", "upper", "--r", "2",
               "--target-modules", "q", "--steps", "1", "--gate-steps", "1", "--batch-size", "2", "--samples", "3"]  # fmt: skip
    assert main([*command, "--out", str(tmp_path / "bare")]) == 1  # no instruction to embed beside the samples
    assert capsys.readouterr().err.startswith("glider train-expert: error: --samples needs the expert's --instruction")
    assert not (tmp_path / "bare").exists()

    assert main([*command, "--out", str(tmp_path / "upper"), "--instruction", "Uppercase the word."]) == 0
    tensors = load_file(tmp_path / "upper" / "glider_expert.safetensors")
    embedder = load_embedder(DEFAULT_EMBEDDING_MODEL)
    every_input = embedder.embed([f"uppercase the word {w}" for w in words])
    samples = tensors["sample_embeddings"]
    assert samples.shape == (3, every_input.shape[1])
    nearest = torch.cdist(samples, every_input).min(dim=1)  # each row is one input's embedding, three different ones
    assert nearest.values.max() < 1e-4 and len(set(nearest.indices.tolist())) == 3
    torch.testing.assert_close(tensors["instruction_embedding"], embedder.embed(["Uppercase the word."])[0])
    meta = json.loads((tmp_path / "upper" / "glider_expert.json").read_text())
    assert meta["embedding_model"] == embedder.model_id
