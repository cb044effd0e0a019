"""glider-mini: the task suite is deterministic and sound, span corruption is invertible, and the one-command build runs
end to end in its smoke configuration."""

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from benchmarks.glider_mini import pretrain, suite

ROOT = Path(__file__).resolve().parents[1]

DIGEST_SCRIPT = """
import hashlib, json
from benchmarks.glider_mini import suite
h = hashlib.sha256()
for name in suite.TASKS:
    for split in suite.SPLITS:
        if suite.TASKS[name].held_out and split == "train":
            continue
        for e in suite.examples(name, split, 40):
            h.update(json.dumps([e.task, e.input, e.target, e.choices, e.template]).encode())
h.update(json.dumps(suite.pretraining_text(50)).encode())
print(h.hexdigest())
"""


def _digest(hash_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_suite_is_deterministic_across_processes():
    # Two interpreters with different string-hash seeds must generate byte-identical data.
    first, second = _digest("1"), _digest("12345")
    assert first == second
    assert len(first) == 64
    # ... and other sizes or seeds really change it (the digest is not constant).
    assert suite.examples("pick_color", "test", 5, seed=1) != suite.examples("pick_color", "test", 5, seed=0)


def test_suite_shape():
    assert len(suite.HELD_IN) >= 12 and len(suite.HELD_OUT) >= 4
    kinds = {suite.TASKS[n].kind for n in suite.TASKS}
    assert kinds == {"generation", "multiple_choice"}
    for name in suite.HELD_IN:
        task = suite.TASKS[name]
        assert task.instruction and task.instruction.endswith(".") and task.eval_templates >= 1
        assert len(task.templates) >= 3 and task.query_instruction != task.instruction
    for name in suite.HELD_OUT:
        assert set(suite.TASKS[name].skills) <= set(suite.HELD_IN)
    # confusable groups: several held-in tasks share one input distribution
    worlds = [suite.TASKS[n].world for n in suite.HELD_IN]
    assert max(worlds.count(w) for w in set(worlds)) >= 3


def test_splits_are_disjoint_and_test_templates_unseen_in_training():
    for name in suite.HELD_IN:
        task = suite.TASKS[name]
        train = suite.examples(name, "train", 300)
        test = suite.examples(name, "test", 60)
        validation = suite.examples(name, "validation", 60)
        assert {e.template for e in train} == set(range(len(task.train_templates)))
        assert {e.template for e in test} == set(range(len(task.templates)))  # includes the unseen templates
        train_inputs = {e.input for e in train}
        assert not train_inputs & {e.input for e in test + validation}
    pretraining = set(suite.pretraining_text(500))
    for name in suite.TASKS:
        for e in suite.examples(name, "test", 30):
            assert e.input not in pretraining


def test_answers_against_an_independent_reading_of_the_prompt():
    # template 0 of these tasks holds the raw input in a fixed place; recompute the answers from the prompt text
    fruits = {"apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"}
    for e in suite.examples("pick_fruit", "test", 40):
        if e.template == 0:
            words = e.input.removeprefix("Which word in this list names a fruit: ").removesuffix("?").split(", ")
            assert len(words) == 5 and [w for w in words if w in fruits] == [e.target]
            assert e.choices == tuple(words)
    for e in suite.examples("schedule_platform", "test", 40):
        if e.template == 0:
            words = e.input.replace(".", "").replace(":", "").replace(",", "").lower().split()
            assert e.target == words[words.index("platform") + 1]  # the entry comes before the question
    for e in suite.examples("fruit_and_color", "validation", 40):
        words = e.input.split("in ", 1)[1].split("?")[0].split(", ") if e.template == 0 else None
        if words:
            fruit = next(w for w in words if w in fruits)
            assert e.target.startswith(fruit + ", ") and e.target.split(", ")[1] in words
    for name in suite.TASKS:
        for e in suite.examples(name, "validation", 20):
            if suite.TASKS[name].kind == "multiple_choice":
                assert e.target in e.choices and len(set(e.choices)) == len(e.choices)


def test_span_corruption_inverts_to_the_original():
    rng = random.Random(0)
    sentinels = list(range(1000, 1010))
    for length in (2, 5, 17, 40):
        ids = [rng.randrange(3, 500) for _ in range(length)]
        example = pretrain.span_corrupt(ids, sentinels, eos_id=1, rng=rng)
        inputs, labels = example["input_ids"][:-1], example["labels"][:-1]
        assert example["input_ids"][-1] == example["labels"][-1] == 1
        # independent inverse: each sentinel in the input is replaced by the tokens after it in the labels
        spans, current = {}, None
        for token in labels:
            if token in sentinels:
                current = token
                spans[current] = []
            else:
                spans[current].append(token)
        restored = [t for token in inputs for t in (spans[token] if token in sentinels else [token])]
        assert restored == ids
        noise = sum(len(s) for s in spans.values())
        assert 1 <= noise < length and labels[0] == sentinels[0]


def test_metrics_load_offline_from_local_folders_and_score_by_hand():
    import evaluate

    metrics = ROOT / "benchmarks" / "metrics"
    exact = evaluate.load(str(metrics / "exact_match"))
    assert exact.compute(predictions=[" tiger", "Omar", "4"], references=["tiger", "omar", "4"]) == {
        "exact_match": 2 / 3
    }
    rank = evaluate.load(str(metrics / "rank_classification"))
    # lowest length-normalised cross-entropy wins; ties go to the first choice
    scores = [[2.0, 0.5, 1.0], [0.3, 0.3], [1.0, 4.0, 0.9, 2.0]]
    assert rank.compute(predictions=scores, references=[1, 1, 2]) == {"accuracy": 2 / 3}


def test_baselines_recovered_from_a_glider_model_match_peft(tmp_path):
    """Base, exported experts and the uniform merge, taken from a GliderT5's weights, against the original PEFT
    adapters (PEFT's own model, and a merge computed here from the adapter files)."""
    import copy

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from benchmarks.glider_mini import library
    from modeling_glider import GliderT5ForConditionalGeneration
    from tests.conftest import EMBED_DIM, make_base, make_expert

    base = make_base(seed=1)
    dirs = [
        make_expert(tmp_path / "in", base, "a", r=2, lora_alpha=4, seed=1, embedding=torch.ones(EMBED_DIM)),
        make_expert(
            tmp_path / "in", base, "b", r=4, targets=("q", "v", "wo"), seed=2, embedding=-torch.ones(EMBED_DIM)
        ),
    ]
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2).eval()
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    decoder_ids = torch.randint(2, 64, (2, 3), generator=torch.Generator().manual_seed(1))

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids, decoder_input_ids=decoder_ids).logits

    recovered = library.base_model(model)
    torch.testing.assert_close(logits(recovered), logits(base), rtol=0, atol=0)
    exported = library.export_experts(model, tmp_path / "out")
    for original, copy_ in zip(dirs, exported):
        expected = PeftModel.from_pretrained(copy.deepcopy(base), original).eval()
        got = PeftModel.from_pretrained(copy.deepcopy(recovered), copy_).eval()
        torch.testing.assert_close(logits(got), logits(expected))
    # uniform merge: W + 1/2 (s_a B_a A_a + s_b B_b A_b), read from the adapter files here
    merged = copy.deepcopy(base)
    for directory, scaling in zip(dirs, (4 / 2, 8 / 4)):
        adapter = load_file(directory / "adapter_model.safetensors")
        for key, A in adapter.items():
            if key.endswith("lora_A.weight"):
                B = adapter[key.replace("lora_A", "lora_B")]
                path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                merged.get_submodule(path).weight.data += 0.5 * scaling * (B @ A)
    torch.testing.assert_close(logits(library.merged_model(model)), logits(merged))


def test_build_runs_end_to_end_in_the_smoke_configuration(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.glider_mini import build

    out = build.build(tmp_path / "mini", build.SMOKE, command=["smoke"])
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["recipe"]["tasks"] == list(build.SMOKE.tasks)
    assert recipe["versions"]["torch"] and recipe["versions"]["transformers"]
    listed = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    assert sorted(listed) == files and "model.safetensors" in listed
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest

    import modeling_glider  # noqa: F401  registers glider_t5

    model = AutoModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.expert_names == list(build.SMOKE.tasks)
    assert model.config.instruction_embedding_dim == 384
    assert not any(str(tmp_path) in e["source"] for e in model.config.experts)  # no path of the build machine
    inputs = tokenizer(["Reverse the order of these words: cat, dog, sun"], return_tensors="pt")
    u = model.global_router.expert_embeddings[:1]
    output = model.generate(**inputs, instruction_embeddings=u, max_new_tokens=4)
    assert output.shape[0] == 1

    # a rerun reuses every finished stage and rebuilds the same files
    before = (out / "SHA256SUMS").read_text()
    build.build(tmp_path / "mini", build.SMOKE, command=["smoke"])
    assert (out / "SHA256SUMS").read_text() == before


COMMITTED = ROOT / "glider-mini"


def test_committed_glider_mini_is_intact():
    assert COMMITTED.is_dir(), "glider-mini/ is committed with the repository"
    listed = dict(reversed(line.split("  ", 1)) for line in (COMMITTED / "SHA256SUMS").read_text().splitlines())
    files = sorted(p.relative_to(COMMITTED).as_posix() for p in COMMITTED.rglob("*") if p.is_file())
    assert sorted([*listed, "SHA256SUMS"]) == files
    for name, digest in listed.items():
        assert hashlib.sha256((COMMITTED / name).read_bytes()).hexdigest() == digest, name
    recipe = json.loads((COMMITTED / "recipe.json").read_text())
    config = json.loads((COMMITTED / "config.json").read_text())
    assert [e["name"] for e in config["experts"]] == recipe["recipe"]["tasks"] == suite.HELD_IN
    assert config["global_routing_policy"] == recipe["recipe"]["global_routing_policy"]


def test_committed_glider_mini_demo_runs(tmp_path, capsys):
    from modeling_glider.demo import QUERIES, run_demo

    records = run_demo(out_dir=tmp_path, model_dir=COMMITTED)
    printed = capsys.readouterr().out
    assert len(records) == len(QUERIES)
    for record in records:
        assert record["query"] in printed and repr(record["answer"]) in printed
        assert abs(sum(e["weight"] for e in record["experts"]) - 1) < 1e-4
    # the global router sends each held-in query to its task's expert, and the experts answer most of them
    own_expert = {"animal": "pick_animal", "color": "pick_color", "Where": "story_where", "object": "story_what",
                  "platform": "schedule_platform"}  # fmt: skip
    held_in = [r for r in records if r["kind"] == "held-in"]
    for record in held_in:
        task = next(task for word, task in own_expert.items() if word in record["query"])
        assert record["experts"][0]["name"] == task, record
    assert sum(r["answer"] == r["expected"] for r in held_in) >= len(held_in) - 1
    png = (tmp_path / "routing_heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_benchmark_runs_end_to_end_on_the_committed_glider_mini(tmp_path):
    from benchmarks.glider_mini import benchmark
    from modeling_glider.hub import load_eval_results

    results = benchmark.run_benchmark(COMMITTED, tmp_path, validation_size=2, test_size=2, full=True)
    methods = results["methods"]
    assert set(methods) == set(benchmark.METHODS)
    for name, method in methods.items():
        tasks = suite.HELD_IN if name == "oracle" else [*suite.HELD_IN, *suite.HELD_OUT]
        assert list(method["tasks"]) == tasks, name
        assert set(method["tasks"].values()) <= {0.0, 50.0, 100.0}, name  # two prompts per task
        held_in = sum(method["tasks"][t] for t in suite.HELD_IN) / len(suite.HELD_IN)
        assert abs(method["held_in"] - held_in) < 1e-9, name
    # the global router is what lifts held-in tasks above token-level routing (as in the committed full run)
    assert methods["glider"]["held_in"] > methods["phatgoose"]["held_in"] + 10
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("Made by `python -m benchmarks.glider_mini.benchmark --model ")
    assert all(label in table for label in benchmark.METHODS.values())
    assert load_eval_results(tmp_path / "eval_results.json")  # usable for the model card
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
    candidates = results["router_candidates"]["splits"]
    assert candidates["test"]["None"]["tasks"] == methods["glider"]["tasks"]  # every expert a candidate: GLIDER
    shares = [
        candidates[s][m]["certified_exact"][p]
        for s in candidates
        for m in ("2", "4", "8")
        for p in ("held_in", "held_out")
    ]
    assert all(0 <= share <= 100 for share in shares)
    assert "Candidate experts per query" in table
    # every descriptor of the library scored, the chosen one's test scores being GLIDER's
    assert set(results["descriptors"]) == {"instruction", "samples", "both"}
    chosen = results["policy"]["chosen"]["global_routing_descriptor"]
    assert results["descriptors"][chosen]["test"] == methods["glider"]
    assert methods["glider_instruction_descriptor"] == results["descriptors"]["instruction"]["test"]
    assert results["glider_check"]["through_the_model"] == methods["glider"]["tasks"]


def test_candidates_benchmark_runs_standalone(tmp_path):
    from benchmarks.glider_mini import candidates

    candidates.main(["--model", str(COMMITTED), "--out", str(tmp_path), "--validation-size", "2", "--test-size", "2"])
    results = json.loads((tmp_path / "router_candidates.json").read_text())
    assert set(results["splits"]["test"]) == {"None", "2", "4", "8"}
    head = (tmp_path / "router_candidates.md").read_text().splitlines()[0]
    assert head.startswith("Made by `python -m benchmarks.glider_mini.candidates --model ") and "torch thread" in head
