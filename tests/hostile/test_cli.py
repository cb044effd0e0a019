"""Every `glider` subcommand given bad input: exactly one line `glider <command>: error: ...` on stderr naming the
culprit, a non-zero exit status, no traceback, and no file changed."""

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file

from modeling_glider.cli import main
from tests.conftest import make_base, make_expert
from tests.hostile.test_expert_inputs import BAD_NAMES, tree_hashes

GLIDER_MINI = Path(__file__).parents[2] / "glider-mini"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """Files the commands read: a base with its tokenizer, a good expert, broken experts, a checkpoint, data."""
    root = tmp_path_factory.mktemp("world")
    base = make_base(seed=1)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    good = make_expert(root, base, "good", r=2, targets=("q", "wo"), seed=1)
    for name in ("corrupt", "badjson", "badregex", "dotdot", "pissa"):
        shutil.copytree(good, root / name)
        (root / name / "glider_expert.json").write_text(json.dumps({"name": name}))
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    (root / "badjson" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2,')
    for name, changes in (("badregex", {"rank_pattern": {"(q": 2}}), ("pissa", {"init_lora_weights": "pissa"})):
        config = json.loads((root / name / "adapter_config.json").read_text())
        (root / name / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    (root / "dotdot" / "glider_expert.json").write_text(json.dumps({"name": "../x"}))
    state = {
        k.replace(".weight", ".default.weight"): v for k, v in load_file(good / "adapter_model.safetensors").items()
    }
    torch.save(state, root / "task_best.pt")
    (root / "corrupt_best.pt").write_bytes(b"PK\x03\x04 truncated zip")
    (root / "broken.json").write_text("{'single': 'quotes'}")
    (root / "data.jsonl").write_text(json.dumps({"input": "sort the letters of banana", "target": "aaabnn"}) + "\n")
    (root / "strict").mkdir()  # a saved GliderT5 config with a field of the wrong type
    (root / "strict" / "config.json").write_text(json.dumps({"model_type": "glider_t5", "router_top_k": "2"}))
    return root


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the probe is closed


def run_failing(argv: list[str], capsys) -> tuple[int, str]:
    """Run the command; its stderr holds one error line (progress bars of loading a model may come before it)."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("glider")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert lines[0].startswith(f"glider {argv[0]}: error: "), lines[0]
    assert "Traceback" not in err
    return code, lines[0]


def build(*extra):
    return ["build", "--base", "{w}/base", "--out", "{w}/built", *extra]


def train_gates(*extra):
    return ["train-gates", "--base", "{w}/base", "--data", "{w}/data.jsonl", "--expert", "{w}/good", *extra]


def train_expert(*extra):
    return ["train-expert", "--base", "{w}/base", "--data", "{w}/data.jsonl", "--out", "{w}/new", *extra]


CASES = [
    (build("--experts", "{w}/good", "--top-k", "0"), "--top-k"),
    (build("--experts", "{w}/good", "--top-k", "two"), "--top-k"),
    (build("--experts", "{w}/good", "--top-p", "1.5"), "--top-p"),
    (build("--experts", "{w}/good", "--global-routing-scale", "nan"), "--global-routing-scale"),
    (build("--experts", "{w}/good", "--arrow-temperature", "0"), "--arrow-temperature"),
    (build("--experts", "{w}/good", "--top-k", "3"), "router_top_k"),
    (build("--experts", "{w}/nowhere"), "nowhere"),
    (build("--experts", "{w}/corrupt"), "adapter_model.safetensors"),
    (build("--experts", "{w}/badjson"), "adapter_config.json"),
    (build("--experts", "{w}/badregex"), "rank_pattern key '(q'"),
    (build("--experts", "{w}/dotdot"), "'../x'"),
    (build("--experts", "{w}/pissa"), "init_lora_weights='pissa'"),
    (build("--experts", "{w}/good", "--dtype", "int8"), "--dtype: invalid choice: 'int8'"),
    (build("--experts", "{w}/good", "--dtype", "bf16"), "--dtype: invalid choice: 'bf16'"),
    (build("--experts", "{w}/good", "--max-shard-size", "0"), "--max-shard-size: expected a size"),
    (build("--experts", "{w}/good", "--max-shard-size=-5GB"), "--max-shard-size: expected a size"),
    (build("--experts", "{w}/good", "--max-shard-size", "1.5GB"), "--max-shard-size: expected a size"),
    (build("--experts", "{w}/good", "--max-shard-size", "lots"), "--max-shard-size: expected a size"),
    (train_gates("--steps", "0"), "--steps"),
    (train_gates("--learning-rate", "-1"), "--learning-rate"),
    (train_gates("--batch-size", "x"), "--batch-size"),
    (train_gates("--gradient-accumulation-steps", "0"), "--gradient-accumulation-steps"),
    (["train-gates", "--base", "{w}/base", "--data", "{w}/data.jsonl", "--expert", "{w}/missing"], "missing"),
    (train_expert("--name", "../evil"), "'../evil'"),
    (train_expert("--name", "ok", "--r", "0"), "--r"),
    (train_expert("--name", "ok", "--warmup-ratio", "1"), "--warmup-ratio"),
    (train_expert("--name", "ok", "--target-modules", "("), "target_modules entry '('"),
    (["convert", "{w}/nope.pt", "--out", "{w}/out"], "nope.pt"),
    (["convert", "{w}/task_best.pt", "--out", "{w}/out", "--embedding-dim", "0"], "--embedding-dim"),
    (["convert", "{w}/task_best.pt", "--out", "{w}/out", "--instructions", "{w}/broken.json"], "broken.json"),
    (["convert", "{w}/corrupt_best.pt", "--out", "{w}/out"], "corrupt_best.pt"),
    (["convert", "{w}/task_best.pt", "--out", "{w}/out", "--lora-alpha", "inf"], "--lora-alpha"),
    (["describe-experts", "{w}/good", "--instruction", "no-equals-sign"], "--instruction"),
    (["describe-experts", "{w}/good", "--instruction", "good=A.", "--instruction", "good=B."], "'good' twice"),
    (["describe-experts", "{w}/good", "--instructions", "{w}/broken.json"], "broken.json"),
    (["describe-experts", "{w}/good", "--instruction", "unknown=Do it."], "unknown"),
    (["describe-experts", "{w}/good", "-k", "0"], "-k"),
    (["generate", str(GLIDER_MINI), "q", "--num-beams", "0"], "--num-beams"),
    (["generate", str(GLIDER_MINI), "q", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", str(GLIDER_MINI), "q", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "{w}/strict", "q"], "router_top_k"),
    (["push", "{w}/no-model", "org/x"], "no-model"),
    (["push", "{w}/strict", "org/x"], "router_top_k"),
    (["push", str(GLIDER_MINI), "org/x", "--eval-results", "{w}/broken.json"], "broken.json"),
    (["demo", "--model", "{w}/no-model", "--out", "{w}/demo"], "no-model"),
]


@pytest.mark.parametrize("argv, culprit", CASES, ids=[f"{c[0][0]}-{c[1]}" for c in CASES])
def test_bad_input_gives_one_error_line_and_changes_nothing(world, capsys, argv, culprit):
    argv = [arg.format(w=world) for arg in argv]
    before, mini_before = tree_hashes(world), tree_hashes(GLIDER_MINI)
    code, line = run_failing(argv, capsys)
    assert code != 0 and culprit in line, line
    assert tree_hashes(world) == before and tree_hashes(GLIDER_MINI) == mini_before


@pytest.mark.parametrize("name", BAD_NAMES)
def test_convert_names_never_write_outside_out(tmp_path, world, capsys, name):
    checkpoint = shutil.copy(world / "task_best.pt", tmp_path / "task_best.pt")
    out = tmp_path / "deep" / "out"
    before = tree_hashes(tmp_path)
    code, line = run_failing(["convert", str(checkpoint), "--out", str(out), "--names", name], capsys)
    assert code == 1 and repr(name) in line
    assert tree_hashes(tmp_path) == before and not out.exists()


def test_push_to_an_unreachable_endpoint(world, capsys, monkeypatch):
    url = closed_port_url()
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    before = tree_hashes(GLIDER_MINI)
    code, line = run_failing(["push", str(GLIDER_MINI), "org/x", "--token", "hf_unused"], capsys)
    assert code == 1 and url in line and "org/x" in line
    assert tree_hashes(GLIDER_MINI) == before


def test_interrupt_exits_130_with_one_line(world, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("modeling_glider.convert.convert_checkpoints", interrupted)
    code, line = run_failing(["convert", str(world / "task_best.pt"), "--out", str(world / "out")], capsys)
    assert code == 130 and "interrupted" in line


def test_unknown_command_is_one_line(capsys):
    code = main(["frobnicate"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("glider: error:") and "frobnicate" in lines[0]
