"""Gate and expert training against independent references: the gated-LoRA formula written out here, Adam's first step
on a gradient computed here with plain hooks, and real signal on two synthetic tasks."""

import copy
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import T5Tokenizer

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.experts import routable_linears
from modeling_glider.training import PhatgooseGatedLinear, load_pairs, train_expert, train_gates
from tests.conftest import EMBED_DIM, make_base, make_expert, train_sentencepiece

FRUITS = "apple banana cherry grape lemon mango peach plum".split()
NUMBERS = "one two three four five six seven eight".split()
QUIET = {"disable_tqdm": True, "logging_steps": 1000}


def task_rows(words, seed, n=64):
    """Four words of one vocabulary; fruits are reversed, numbers rotated by one. Fixed lengths: no padding."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seq = [rng.choice(words) for _ in range(4)]
        target = seq[::-1] if words is FRUITS else seq[1:] + seq[:1]
        rows.append({"input": " ".join(seq), "target": " ".join(target)})
    return rows


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """One token per word, so the two tasks share no input token but EOS."""
    texts = [" ".join(FRUITS), " ".join(NUMBERS)] * 20
    directory = train_sentencepiece(
        tmp_path_factory.mktemp("word_tokenizer"), texts, len(FRUITS) + len(NUMBERS) + 3, "word"
    )
    tokenizer = T5Tokenizer.from_pretrained(directory, extra_ids=0)
    assert tokenizer.tokenize("apple one") == ["▁apple", "▁one"]
    return tokenizer


def word_base(seed=0, d_model=64):
    return make_base(seed, vocab_size=32, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model)


def test_gated_linear_is_the_phatgoose_formula():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=False)
    A, B, x = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), torch.randn(3, 4, 6, generator=g)
    layer = PhatgooseGatedLinear(linear, A, B, scaling=0.25)
    assert sorted(name for name, _ in layer.named_parameters()) == ["gate", "linear.weight"]
    assert torch.equal(layer.gate, torch.zeros(6))  # v = 0 at start: every gate half open
    torch.testing.assert_close(layer(x), linear(x) + 0.5 * 0.25 * x @ A.T @ B.T)
    with torch.no_grad():
        layer.gate.copy_(torch.randn(6, generator=g))
    for b in range(3):
        for t in range(4):
            xt = x[b, t]
            expected = linear.weight @ xt + torch.sigmoid(layer.gate @ xt) * 0.25 * (B @ (A @ xt))
            torch.testing.assert_close(layer(x)[b, t], expected)


def reference_gate_gradients(base, expert_dir, tokenizer, rows):
    """d loss / d v at v = 0 for every adapted linear, with plain forward hooks on a copy of the base model."""
    model = copy.deepcopy(base)
    adapter = load_file(expert_dir / "adapter_model.safetensors")
    config = json.loads((expert_dir / "adapter_config.json").read_text())
    gates = {}
    for key, A in adapter.items():
        if key.endswith(".lora_A.weight"):
            path = key[len("base_model.model.") : -len(".lora_A.weight")]
            B = adapter[key.replace("lora_A", "lora_B")]
            gates[path] = torch.zeros(A.shape[1], requires_grad=True)
            scaling = config["lora_alpha"] / config["r"]

            def hook(module, args, output, A=A, B=B, v=gates[path], s=scaling):
                x = args[0]
                return output + torch.sigmoid(x @ v)[..., None] * s * (x @ A.T @ B.T)

            model.get_submodule(path).register_forward_hook(hook)
    inputs = tokenizer([r["input"] for r in rows], return_tensors="pt", padding=True)
    labels = tokenizer(text_target=[r["target"] for r in rows], return_tensors="pt", padding=True).input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    model(**inputs, labels=labels).loss.backward()
    return {path: v.grad for path, v in gates.items()}


def test_one_gate_step_is_adams_first_step_on_the_reference_gradient(tmp_path, word_tokenizer):
    """With the whole data set in one batch, AdamW's first step moves each v from 0 by -lr * g / (|g| + eps), g the
    clipped gradient: the trained gates must match the gradient of the recipe computed here."""
    base = word_base(seed=3)
    expert_dir = make_expert(tmp_path, base, "fruit", r=4, lora_alpha=8, seed=1, embedding=torch.arange(8.0))
    meta = {"name": "fruit", "instruction": "Reverse the fruits.", "source": "kept as it is"}
    (expert_dir / "glider_expert.json").write_text(json.dumps(meta))
    adapter_before = (expert_dir / "adapter_model.safetensors").read_bytes()
    state_before = {k: v.clone() for k, v in base.state_dict().items()}
    base.encoder.block[0].layer[0].SelfAttention.q.weight.requires_grad_(False)  # flags must come back as they were
    rows = task_rows(FRUITS, seed=0, n=12)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    lr = 1e-3
    train_gates(base, expert_dir, tmp_path / "data.jsonl", tokenizer=word_tokenizer, steps=1, learning_rate=lr,
                batch_size=len(rows), trainer_args=QUIET)  # fmt: skip

    expected = reference_gate_gradients(base, expert_dir, word_tokenizer, rows)
    tensors = load_file(expert_dir / "glider_expert.safetensors")
    assert set(tensors) == {f"gate.{path}" for path in expected} | {"instruction_embedding"}
    assert torch.equal(tensors["instruction_embedding"], torch.arange(8.0))
    clip = min(1.0, 1.0 / (torch.cat(list(expected.values())).norm().item() + 1e-6))  # the Trainer's max_grad_norm=1
    for path, g in expected.items():
        g = clip * g
        torch.testing.assert_close(tensors[f"gate.{path}"], -lr * g / (g.abs() + 1e-8), atol=lr * 1e-4, rtol=0)
    # the base model, its flags and mode, the LoRA weights and the metadata are as they were
    assert all(torch.equal(v, state_before[k]) for k, v in base.state_dict().items())
    assert not base.encoder.block[0].layer[0].SelfAttention.q.weight.requires_grad
    assert base.decoder.block[0].layer[0].SelfAttention.q.weight.requires_grad and not base.training
    assert type(base.encoder.block[0].layer[0].SelfAttention.q) is torch.nn.Linear
    assert (expert_dir / "adapter_model.safetensors").read_bytes() == adapter_before
    weights_sha256 = hashlib.sha256((expert_dir / "glider_expert.safetensors").read_bytes()).hexdigest()
    assert json.loads((expert_dir / "glider_expert.json").read_text()) == {**meta, "weights_sha256": weights_sha256}
    assert not list(expert_dir.glob(".*"))  # no temporary file left


def test_train_gates_makes_a_plain_peft_adapter_an_expert(tmp_path, word_tokenizer):
    base = word_base(seed=3)
    adapter_dir = make_expert(tmp_path, base, "numbers_adapter", r=2, seed=4, gates=False)
    (adapter_dir / "glider_expert.json").unlink()  # a plain PEFT adapter folder
    rows = task_rows(NUMBERS, seed=0, n=8)
    train_gates(base, adapter_dir, rows, tokenizer=word_tokenizer, instruction="Rotate the numbers.", steps=2,
                trainer_args=QUIET)  # fmt: skip
    assert json.loads((adapter_dir / "glider_expert.json").read_text()) == {
        "name": "numbers_adapter",
        "instruction": "Rotate the numbers.",
        "weights_sha256": hashlib.sha256((adapter_dir / "glider_expert.safetensors").read_bytes()).hexdigest(),
    }
    model = GliderT5ForConditionalGeneration.from_experts(base, [adapter_dir], top_k=1)
    assert model.config.expert_names == ["numbers_adapter"]


@pytest.fixture(scope="module")
def two_task_experts(tmp_path_factory, word_tokenizer):
    """Two experts trained with `train_expert` (LoRA, then Phatgoose gates with the default recipe) on two tasks."""
    root = tmp_path_factory.mktemp("experts")
    base = word_base(seed=0)
    data = {"fruit": task_rows(FRUITS, seed=0), "numbers": task_rows(NUMBERS, seed=1)}
    dirs = {
        name: train_expert(
            base,
            rows,
            root / name,
            name=name,
            instruction=f"The {name} task.",
            tokenizer=word_tokenizer,
            r=4,
            lora_alpha=8,
            steps=100,
            learning_rate=1e-2,
            batch_size=16,
            trainer_args=QUIET,
        )  # fmt: skip
        for name, rows in data.items()
    }
    return base, data, dirs


def test_gate_training_learns_real_signal(two_task_experts, word_tokenizer):
    base, data, dirs = two_task_experts
    encoded = {
        task: (
            word_tokenizer([r["input"] for r in rows], return_tensors="pt"),
            word_tokenizer(text_target=[r["target"] for r in rows], return_tensors="pt").input_ids,
        )
        for task, rows in data.items()
    }

    def mean_gate(expert, task):
        """Mean sigmoid(v . x) over every token at every adapted linear, with hooks on the plain base model."""
        gates = {k[5:]: v for k, v in load_file(dirs[expert] / "glider_expert.safetensors").items()}
        fired = []
        hooks = [
            linear.register_forward_hook(lambda m, args, out, v=gates[path]: fired.append(torch.sigmoid(args[0] @ v)))
            for path, linear in routable_linears(base).items()
            if path in gates
        ]
        with torch.no_grad():
            base(**encoded[task][0], labels=encoded[task][1])
        for hook in hooks:
            hook.remove()
        return torch.cat([f.flatten() for f in fired]).mean().item()

    for expert, other in [("fruit", "numbers"), ("numbers", "fruit")]:
        assert mean_gate(expert, expert) > mean_gate(expert, other) + 0.03, expert

    model = GliderT5ForConditionalGeneration.from_experts(base, [dirs["fruit"], dirs["numbers"]], top_k=1)
    for index, task in enumerate(["fruit", "numbers"]):
        inputs, labels = encoded[task]
        with torch.no_grad():
            routing = model(**inputs, labels=labels, output_routing=True).routing  # local routing only
        share = routing.expert_usage(2, len(labels)).mean(dim=0)[index]
        assert share > 0.55, (task, share)


def test_train_expert_writes_a_complete_peft_expert(two_task_experts, word_tokenizer):
    base, data, dirs = two_task_experts
    directory = dirs["fruit"]
    assert json.loads((directory / "glider_expert.json").read_text()) == {
        "name": "fruit",
        "instruction": "The fruit task.",
        "weights_sha256": hashlib.sha256((directory / "glider_expert.safetensors").read_bytes()).hexdigest(),
    }
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]  # `wi` is not in a gated T5
    adapted = {
        k[len("base_model.model.") : -len(".lora_A.weight")]
        for k in load_file(directory / "adapter_model.safetensors")
        if "lora_A" in k
    }
    assert adapted == set(routable_linears(base))
    gates = load_file(directory / "glider_expert.safetensors")
    assert set(gates) == {f"gate.{path}" for path in adapted}
    assert all(gate.abs().sum() > 0 for gate in gates.values())
    assert not list(directory.parent.glob(".*"))  # no staging folder left

    # PEFT alone loads it; the training changed the model's output, and the user's base is unchanged
    inputs = word_tokenizer([data["fruit"][0]["input"]], return_tensors="pt")
    decoder_input_ids = torch.zeros(1, 1, dtype=torch.long)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    with torch.no_grad():
        tuned = peft_model(**inputs, decoder_input_ids=decoder_input_ids).logits
        plain = base(**inputs, decoder_input_ids=decoder_input_ids).logits
    assert not torch.allclose(tuned, plain, atol=1e-3)
    assert all(type(m) is not PhatgooseGatedLinear for m in base.modules()) and not base.training
    assert all(p.requires_grad for p in base.parameters())


def test_load_pairs_accepts_lists_jsonl_and_datasets(tmp_path):
    import datasets

    rows = [{"input": "a", "target": "b"}, {"input": "c", "target": ""}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    from_dataset = datasets.Dataset.from_list([{**r, "extra": 1} for r in rows])
    for data in (rows, tmp_path / "d.jsonl", str(tmp_path / "d.jsonl"), from_dataset):
        assert load_pairs(data).to_list() == rows


# Bad input gets an error that names the culprit, and nothing is written.


def test_training_data_errors(tmp_path):
    import datasets

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"input": "a", "target": "b"}\n{"input": "a", "target": \n')
    no_target = tmp_path / "no_target.jsonl"
    no_target.write_text('{"input": "a", "target": "b"}\n{"input": "a"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (tmp_path / "missing.jsonl", FileNotFoundError, "missing.jsonl: no such file"),
        (bad_json, ValueError, r"bad.jsonl, line 2: not valid JSON"),
        (no_target, ValueError, r"no_target.jsonl, line 2: expected an object with string 'input' and 'target'"),
        (empty, ValueError, "holds no examples"),
        ([{"input": "a", "target": 3}], ValueError, "item 0"),
        (datasets.Dataset.from_dict({"question": ["a"], "target": ["b"]}), ValueError, r"no \['input'\] column"),
        (datasets.Dataset.from_dict({"input": [1], "target": ["b"]}), ValueError, "'input' must hold strings"),
        (42, TypeError, "JSONL path"),
    ]
    for data, error, message in cases:
        with pytest.raises(error, match=message):
            load_pairs(data)


def test_train_gates_errors_write_nothing(tmp_path, word_tokenizer):
    base = word_base(seed=3)
    expert_dir = make_expert(tmp_path, base, "fruit", r=2, seed=1)
    before = (expert_dir / "glider_expert.safetensors").read_bytes()
    rows = task_rows(FRUITS, seed=0, n=4)
    small = word_base(seed=3, d_model=32)
    cases = [
        ({"data": tmp_path / "nope.jsonl"}, FileNotFoundError, "nope.jsonl"),
        ({"steps": 0}, ValueError, "steps must be an integer >= 1"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate must be a finite number > 0"),
        ({"base": small}, ValueError, r"Expert 'fruit'.*was it made for another base model"),
        ({"tokenizer": None}, ValueError, "Pass tokenizer="),
        ({"name": "other"}, ValueError, "already named 'fruit'"),
        ({"expert_dir": tmp_path / "missing"}, FileNotFoundError, "missing: no such directory"),
    ]
    for overrides, error, message in cases:
        kwargs = {"base": base, "expert_dir": expert_dir, "data": rows, "tokenizer": word_tokenizer, "steps": 1}
        kwargs.update(overrides)
        with pytest.raises(error, match=message):
            train_gates(kwargs.pop("base"), kwargs.pop("expert_dir"), kwargs.pop("data"), trainer_args=QUIET, **kwargs)
    adapter = load_file(expert_dir / "adapter_model.safetensors")
    key = next(k for k in adapter if "lora_B" in k)
    adapter[key][0, 0] = float("nan")
    save_file(adapter, expert_dir / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"Expert 'fruit'.*NaN"):
        train_gates(base, expert_dir, rows, tokenizer=word_tokenizer, steps=1)
    assert (expert_dir / "glider_expert.safetensors").read_bytes() == before
    assert not list(expert_dir.glob(".*"))


def test_train_expert_errors_write_nothing(tmp_path, word_tokenizer):
    base = word_base(seed=3)
    rows = task_rows(FRUITS, seed=0, n=4)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = [
        ({"output_dir": tmp_path / "taken"}, FileExistsError, "taken already exists"),
        ({"target_modules": ["lm_head", "wi"]}, ValueError, r"match no linear of the base; its linears: \['k', 'o'"),
        ({"r": 0}, ValueError, "r must be an integer >= 1"),
        ({"name": ""}, ValueError, "name '' is not a non-empty string"),
        ({"data": []}, ValueError, "holds no examples"),
    ]
    for overrides, error, message in cases:
        kwargs = {"output_dir": tmp_path / "new", "name": "fruit", "data": rows, "tokenizer": word_tokenizer}
        kwargs.update(overrides)
        with pytest.raises(error, match=message):
            train_expert(base, kwargs.pop("data"), kwargs.pop("output_dir"), steps=1, trainer_args=QUIET, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_instruction_embedding_goes_into_the_trained_expert(tmp_path, word_tokenizer):
    base = word_base(seed=3)
    u = torch.randn(EMBED_DIM)
    directory = train_expert(
        base, task_rows(FRUITS, seed=0, n=4), tmp_path / "fruit", name="fruit", tokenizer=word_tokenizer, r=2,
        target_modules=["q", "v"], steps=1, train_gates_after=False, instruction_embedding=u,
        embedding_model="my-embedder", trainer_args=QUIET,
    )  # fmt: skip
    assert load_file(directory / "glider_expert.safetensors").keys() == {"instruction_embedding"}
    assert json.loads((directory / "glider_expert.json").read_text())["embedding_model"] == "my-embedder"
    model = GliderT5ForConditionalGeneration.from_experts(base, [directory], top_k=1, local_router="arrow")
    assert torch.equal(model.global_router.expert_embeddings[0], u)
    assert model.config.experts[0]["target_modules"] == ["q", "v"]


def test_the_seed_fixes_the_expert(tmp_path, word_tokenizer):
    """Two trainings with one seed give one expert (its LoRA initialisation included, whatever the global random
    state before), another seed another one."""
    base = word_base(seed=3)
    experts = {}
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        torch.manual_seed(1000 + len(experts))  # the global state differs before each run
        directory = train_expert(
            base, task_rows(FRUITS, seed=0, n=4), tmp_path / run, name="fruit", tokenizer=word_tokenizer, r=2,
            target_modules=["q", "v"], steps=1, train_gates_after=False, seed=seed, trainer_args=QUIET,
        )  # fmt: skip
        experts[run] = load_file(directory / "adapter_model.safetensors")
    for key, tensor in experts["a"].items():
        scale = tensor.abs().max().item()
        torch.testing.assert_close(experts["b"][key], tensor, atol=1e-6 * scale, rtol=1e-6)
    assert any((experts["c"][key] - tensor).abs().max() > 1e-3 for key, tensor in experts["a"].items())


def test_gates_train_the_same_over_two_processes(tmp_path, word_tokenizer):
    """`torchrun` with two CPU processes (gloo): each takes half of the one batch, DDP averages the gradients, and the
    main process alone writes the gates, which equal Adam's first step on the reference gradient of the whole batch."""
    base = word_base(seed=3)
    base.save_pretrained(tmp_path / "base")
    word_tokenizer.save_pretrained(tmp_path / "base")
    expert_dir = make_expert(tmp_path, base, "fruit", r=4, lora_alpha=8, seed=1)
    rows = task_rows(FRUITS, seed=0, n=12)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lr = 1e-3
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "modeling_glider.cli", "train-gates", "--base", str(tmp_path / "base"), "--expert", str(expert_dir),
        "--data", str(tmp_path / "data.jsonl"), "--steps", "1", "--batch-size", "6", "--learning-rate", str(lr),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Wrote Phatgoose gates") == 1  # the main process only

    expected = reference_gate_gradients(base, expert_dir, word_tokenizer, rows)
    tensors = load_file(expert_dir / "glider_expert.safetensors")
    clip = min(1.0, 1.0 / (torch.cat(list(expected.values())).norm().item() + 1e-6))
    for path, g in expected.items():
        g = clip * g
        torch.testing.assert_close(tensors[f"gate.{path}"], -lr * g / (g.abs() + 1e-8), atol=lr * 1e-3, rtol=0)


def assert_adam_first_step(got: dict, gradients: dict, lr: float) -> None:
    """`got` is the Trainer's first AdamW step from zero on `gradients` (the reference): clipped to norm 1 together,
    then -lr g / (|g| + eps). Gradients summed in another order (over processes) differ by ~1e-5 of the largest; the
    step of an element whose gradient is that small is that uncertain, so its tolerance grows as eps / (|g| + eps)^2."""
    clip = min(1.0, 1.0 / (torch.cat([g.flatten() for g in gradients.values()]).norm().item() + 1e-6))
    noise = 1e-4 * clip * max(g.abs().max().item() for g in gradients.values())
    for key, g in gradients.items():
        g = clip * g
        expected = -lr * g / (g.abs() + 1e-8)
        slack = lr * (1e-3 + 1e-8 * noise / (g.abs() + 1e-8) ** 2)
        error = (got[key] - expected).abs()
        assert (error <= slack).all(), (key, error.max().item())
        assert (got[key].abs() <= lr * (1 + 1e-3)).all(), key


def test_expert_trains_the_same_over_two_processes(tmp_path, word_tokenizer):
    """`torchrun` with two CPU processes runs `train-expert`: each takes half of the one batch, DDP averages the
    gradients, and the main process alone writes one complete expert. One step from B = 0 leaves A as initialised
    (its gradient is zero) and moves B by Adam's first step on the whole batch's gradient, computed here with plain
    hooks from the written A; the gates then take their first step on the gradient with the written A and B."""
    base = word_base(seed=3)
    base.save_pretrained(tmp_path / "base")
    word_tokenizer.save_pretrained(tmp_path / "base")
    rows = task_rows(FRUITS, seed=0, n=6)  # one batch of 2 x 3 rows: both runs see every row at the one step
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lr, gate_lr, out = 1e-3, 2e-3, tmp_path / "experts" / "fruit"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "modeling_glider.cli", "train-expert", "--base", str(tmp_path / "base"), "--out", str(out),
        "--name", "fruit", "--data", str(tmp_path / "data.jsonl"), "--lora-r", "4", "--lora-alpha", "8", "--steps", "1",
        "--batch-size", "3", "--learning-rate", str(lr), "--warmup-ratio", "0", "--gate-steps", "1",
        "--gate-learning-rate", str(gate_lr),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Wrote expert 'fruit'") == 1  # the main process only
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == ["fruit"]  # no staging folder left
    assert {"adapter_config.json", "adapter_model.safetensors", "glider_expert.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # --lora-r passed through torchrun

    adapter = load_file(out / "adapter_model.safetensors")
    model, B_zero = copy.deepcopy(base), {}
    for key, A in adapter.items():
        if key.endswith(".lora_A.weight"):
            path = key[len("base_model.model.") : -len(".lora_A.weight")]
            B_zero[path] = torch.zeros(adapter[key.replace("lora_A", "lora_B")].shape, requires_grad=True)

            def hook(module, args, output, A=A, B=B_zero[path]):
                return output + 8 / 4 * (args[0] @ A.T @ B.T)  # alpha / r

            model.get_submodule(path).register_forward_hook(hook)
    assert set(B_zero) == set(routable_linears(base))
    inputs = word_tokenizer([r["input"] for r in rows], return_tensors="pt", padding=True)
    labels = word_tokenizer(text_target=[r["target"] for r in rows], return_tensors="pt", padding=True).input_ids
    model(**inputs, labels=labels).loss.backward()
    gradients = {f"base_model.model.{path}.lora_B.weight": B.grad for path, B in B_zero.items()}
    assert_adam_first_step(adapter, gradients, lr)
    gradients = {f"gate.{path}": g for path, g in reference_gate_gradients(base, out, word_tokenizer, rows).items()}
    assert_adam_first_step(load_file(out / "glider_expert.safetensors"), gradients, gate_lr)
