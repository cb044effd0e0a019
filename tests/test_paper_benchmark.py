"""`benchmarks/paper/`: rows of the authors' evaluation script run end to end over a model converted from their
`<task>_best.pt` format, on data files written here in P3's and BIG-bench's published formats. Scores are recomputed
in the test from the authors' forward as re-implemented in tests/test_reference_mode.py (rank classification by hand
from its logits, exact match from its greedy generations)."""

import hashlib
import json

import pytest
import torch
from transformers import AutoTokenizer

from benchmarks.paper.rows import BY_NAME, ROWS, TASK_SETS
from benchmarks.paper.run import PAPER_FIGURES, main
from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.embedding import load_embedder
from tests.conftest import EMBED_DIM, assert_decisive, make_base, make_expert
from tests.test_embedding import tiny_encoder_dir  # noqa: F401 (fixture)
from tests.test_reference_mode import TASKS, official_model, released, set_task  # noqa: F401 (fixture)

QUESTIONS = [
    "is the sentence positive or negative answer yes or no",
    "the quick brown fox jumps over the lazy dog",
    "question answer true false maybe always never",
    "sort the letters of banana",
    "reverse the word apple",
]
CHOICES = ["yes", "no", "maybe"]


def p3_lines(choices: bool, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for text in QUESTIONS:
        target = CHOICES[int(torch.randint(3, (1,), generator=g))] if choices else "apple"
        rows.append({
            "inputs_pretokenized": text, "targets_pretokenized": target + " ",
            "answer_choices": CHOICES if choices else [],
        })  # fmt: skip
    return rows


def bigbench_task(choices: bool, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for text in QUESTIONS:
        if choices:
            best = int(torch.randint(3, (1,), generator=g))
            examples.append({"input": text, "target_scores": {c: int(i == best) for i, c in enumerate(CHOICES)}})
        else:
            examples.append({"input": text, "target": ["banana", "apple"]})
    return {"name": "tiny", "examples": examples}


@pytest.fixture(scope="module")
def setup(released, tokenizer, tmp_path_factory):  # noqa: F811
    base, checkpoints, converted, router_table, input_table, _ = released
    root = tmp_path_factory.mktemp("paper")
    model = GliderT5ForConditionalGeneration.from_experts(  # knobs unlike any row's: a row must set each
        base,
        converted,
        top_k=4,
        global_routing_scale=0.5,
        router_top_p=0.9,
        routing_compatibility="glider",
        global_routing_policy="threshold",
        global_routing_threshold=0.99,
        global_routing_scale_unmatched=0.1,
    )
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "data"
    (data / "t0-heldin").mkdir(parents=True)
    (data / "bigbench-hard").mkdir()
    for name, choices, seed in (("p3paws", True, 1), ("p3wiqa", False, 2)):
        lines = [json.dumps(r) for r in p3_lines(choices, seed)]
        (data / "t0-heldin" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    for name, choices, seed in (("bbmc", True, 3), ("bbgen", False, 4)):
        (data / "bigbench-hard" / f"{name}.json").write_text(json.dumps(bigbench_task(choices, seed)))
    g = torch.Generator().manual_seed(9)
    table = {**input_table, "bbmc": torch.randn(EMBED_DIM, generator=g), "bbgen": torch.randn(EMBED_DIM, generator=g)}
    torch.save(table, root / "input.pt")
    return base, checkpoints, router_table, table, root


def recomputed(reference, tokenizer, examples) -> tuple[float, list]:
    """The task's score in percent and its predictions, one example and one choice at a time, from the authors'
    forward."""
    hits, predictions = [], []
    # the answer budget of benchmarks/glider_mini/evaluation.py: the longest first target's tokens (with EOS) plus 4
    budget = max(len(tokenizer(e["targets"][0]).input_ids) for e in examples) + 4
    for e in examples:
        ids = tokenizer(e["input"], return_tensors="pt").input_ids
        if e["choices"]:
            losses = []
            for choice in e["choices"]:
                labels = tokenizer(choice, return_tensors="pt").input_ids
                logits = reference(input_ids=ids, labels=labels).logits[0]
                losses.append(float(-logits.log_softmax(-1).gather(-1, labels[0][:, None]).mean()))
            ranked = sorted(losses)
            assert ranked[1] - ranked[0] > 1e-4 * max(1.0, abs(ranked[0])), "near tie: pick other inputs"
            hits.append(losses.index(ranked[0]) == e["choices"].index(e["target"]))
            predictions.append(losses)
        else:
            out = reference.generate(
                input_ids=ids, max_new_tokens=budget, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
            assert_decisive(out)
            answer = tokenizer.decode(out.sequences[0], skip_special_tokens=True).strip()
            hits.append(answer in e["targets"])
            predictions.append(answer)
    return 100 * sum(hits) / len(hits), predictions


def examples_of(path) -> list[dict]:
    """The examples of a data file, read here independently of benchmarks/paper/data.py."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [
            {"input": r["inputs_pretokenized"], "target": r["targets_pretokenized"].strip(),
             "choices": r["answer_choices"], "targets": [r["targets_pretokenized"].strip()]}
            for r in records
        ]  # fmt: skip
    out = []
    for r in json.loads(path.read_text())["examples"]:
        if "target_scores" in r:
            best = max(r["target_scores"], key=r["target_scores"].get)
            out.append({"input": r["input"], "target": best, "choices": list(r["target_scores"]), "targets": [best]})
        else:
            out.append({"input": r["input"], "target": r["target"][0], "choices": [], "targets": r["target"]})
    return out


@pytest.mark.parametrize("name", ["t0/heldin/top_2-scale_100", "t0/bbh/top_3-scale_3", "t0/bbh/top_0.5-scale_3"])
def test_a_row_scores_as_recomputed_from_the_authors_forward(setup, tokenizer, name, tmp_path, capsys):
    base, checkpoints, router_table, table, root = setup
    row = BY_NAME[name]
    argv = ["--model", str(root / "model"), "--data", str(root / "data"), "--row", name, "--out", str(tmp_path / "o")]
    assert main([*argv, "--input-embeddings", str(root / "input.pt")]) == 0, capsys.readouterr().err
    (result,) = json.loads((tmp_path / "o" / "results.json").read_text())
    assert (result["row"], result["alpha"], result["top_k"], result["top_p"]) == (name, row.alpha, row.top_k, row.top_p)
    assert result["routing"] == "task" and result["paper"] is None
    assert name in (tmp_path / "o" / "results.md").read_text()

    settings = {"alpha": row.alpha, "top_k": row.top_k, "top_p": row.top_p, "drop_last": True, "eps": 1e-6,
                "top_p_over_all": True}  # fmt: skip
    reference = official_model(base, checkpoints, router_table, settings)
    tok = AutoTokenizer.from_pretrained(root / "model")
    folder = root / "data" / row.task_set
    files = sorted(folder.iterdir())
    assert sorted(result["tasks"]) == [p.stem for p in files]
    with torch.no_grad():
        for path in files:
            set_task(settings, table[path.stem])
            expected, predictions = recomputed(reference, tok, examples_of(path))
            assert result["tasks"][path.stem] == pytest.approx(expected, abs=1e-9), path.stem
            got = result["predictions"][path.stem]
            if isinstance(predictions[0], list):  # choice losses, batched and padded differently: a tolerance
                torch.testing.assert_close(torch.tensor(got), torch.tensor(predictions), rtol=1e-4, atol=1e-5)
            else:
                assert [answer.strip() for answer in got] == predictions
    assert result["score"] == pytest.approx(sum(result["tasks"].values()) / len(files))


def test_rows_follow_the_authors_script():
    assert {row.task_set for row in ROWS} == set(TASK_SETS)
    assert {(r.top_k, r.top_p) for r in ROWS if r.name.startswith("t0/bbl/")} == {
        (1, None), (3, None), (2, 0.25), (2, 0.5), (2, 0.75)
    }  # fmt: skip
    assert {r.alpha for r in ROWS} == {None, 3.0, 100.0, 1000.0}
    assert all(r.routing_compatibility == "reference" for r in ROWS)
    figures = json.loads(PAPER_FIGURES.read_text())
    assert set(figures) == set(BY_NAME)  # every row has an entry for the user to fill


def sha256s(folder) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


BAD = {  # file name -> content; each refused naming the file
    "p3paws.jsonl": '{"inputs_pretokenized": "a", "targets_pretokenized": "b", "answer_choices": ["c", "d"]}\n',
    "p3qqp.jsonl": '{"inputs_pretokenized": "a"}\n',
    "p3agnews.jsonl": "not json\n",
    "bbmc.json": '{"examples": []}',
    "bbgen.json": '{"examples": [{"input": "a", "target_scores": {"x": "high", "y": 0}}]}',
}


@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_data_file_is_refused_naming_it(setup, bad, tmp_path, capsys):
    root = setup[-1]
    data = tmp_path / "data" / "t0-heldin"
    data.mkdir(parents=True)
    for path in (root / "data" / "t0-heldin").iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    (data / bad).write_text(BAD[bad])
    before = sha256s(tmp_path)
    argv = ["--model", str(root / "model"), "--data", str(tmp_path / "data"), "--row", "t0/heldin/top_2-scale_100"]
    code = main([*argv, "--out", str(tmp_path / "out"), "--input-embeddings", str(root / "input.pt")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("glider paper: error: ") and err.count("\n") == 1, err
    assert str(data / bad) in err
    assert not (tmp_path / "out").exists() and sha256s(tmp_path) == before


def test_a_missing_task_embedding_and_a_bad_figures_file_are_refused(setup, tmp_path, capsys):
    root = setup[-1]
    torch.save({"p3paws": torch.ones(EMBED_DIM)}, tmp_path / "partial.pt")
    argv = ["--model", str(root / "model"), "--data", str(root / "data"), "--row", "t0/heldin/top_1-scale_100"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--input-embeddings", str(tmp_path / "partial.pt")]) == 1
    assert "no entry for task 'p3wiqa'" in capsys.readouterr().err
    (tmp_path / "figures.json").write_text('{"t0/heldin/top_1-scale_100": "71.3"}')
    assert main([*argv, "--out", str(tmp_path / "o"), "--paper-figures", str(tmp_path / "figures.json")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "figures.json") in err and "t0/heldin/top_1-scale_100" in err
    assert not (tmp_path / "o").exists()


def test_per_query_routing_embeds_each_query(tiny_encoder_dir, tokenizer, tmp_path, capsys):  # noqa: F811
    base = make_base(seed=3)
    g = torch.Generator().manual_seed(4)
    dirs = [
        make_expert(tmp_path / "e", base, f"e{i}", seed=i, embedding=torch.randn(32, generator=g)) for i in range(3)
    ]
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, instruction_embedding_model=str(tiny_encoder_dir))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data" / "t0-heldin").mkdir(parents=True)
    path = tmp_path / "data" / "t0-heldin" / "p3paws.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in p3_lines(True, 5)))
    name = "t0/heldin/top_1-scale_100"
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--row", name]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0, capsys.readouterr().err
    (result,) = json.loads((tmp_path / "o" / "results.json").read_text())
    assert result["routing"] == "query"

    # by hand: each query's own embedding (the embedder is tested in tests/test_embedding.py), one choice at a time
    embedder = load_embedder(str(tiny_encoder_dir))
    model.config.update({"routing_compatibility": "reference", "router_top_k": 1, "global_routing_scale": 100.0})
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    expected = []
    with torch.no_grad():
        for e in examples_of(path):
            ids = tok(e["input"], return_tensors="pt").input_ids
            u = embedder.embed([e["input"]])
            losses = []
            for choice in e["choices"]:
                labels = tok(choice, return_tensors="pt").input_ids
                logits = model(input_ids=ids, labels=labels, instruction_embeddings=u).logits[0]
                losses.append(float(-logits.log_softmax(-1).gather(-1, labels[0][:, None]).mean()))
            expected.append(losses)
    torch.testing.assert_close(
        torch.tensor(result["predictions"]["p3paws"]), torch.tensor(expected), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("case", ["missing task set", "out not empty", "unknown row"])
def test_bad_arguments_are_refused_in_one_line_naming_the_culprit(setup, case, tmp_path, capsys):
    root = setup[-1]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("kept")
    row, data, out = "t0/heldin/top_2-scale_100", root / "data", tmp_path / "new"
    culprit = {"missing task set": str(root / "data" / "t0-heldout"), "out not empty": str(tmp_path / "out")}
    culprit["unknown row"] = "t0/heldin/top_4"
    if case == "missing task set":
        row = "t0/heldout/top_1-scale_3"
    elif case == "out not empty":
        out = tmp_path / "out"
    else:
        row = "t0/heldin/top_4"
    before = sha256s(tmp_path)
    code = main(["--model", str(root / "model"), "--data", str(data), "--row", row, "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("glider paper: error: ") and err.count("\n") == 1, err
    assert culprit[case] in err
    assert sha256s(tmp_path) == before and not (tmp_path / "new").exists()
