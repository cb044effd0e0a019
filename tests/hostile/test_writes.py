"""Writes are all or nothing. Every command that writes (describe-experts, save_pretrained, build, train-gates,
train-expert, convert) is made to fail, or killed, halfway; the folders it touches must then be byte for byte as
they were (sha256 of every file, hidden ones included), or hold the complete new state, and no staging file may be
left behind by a failure that Python sees. Kills are real: a child process ends itself with `os._exit` inside the
write, so no cleanup code runs."""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import modeling_glider.convert as convert_module
import modeling_glider.experts as experts_module
from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.cli import main
from modeling_glider.convert import convert_checkpoints
from modeling_glider.describe import describe_experts
from modeling_glider.embedding import InstructionEmbedder
from modeling_glider.experts import load_expert
from modeling_glider.library import build_library
from modeling_glider.training import train_expert, train_gates
from tests.conftest import EMBED_DIM, make_base, make_expert

REPO = Path(__file__).resolve().parents[2]
QUIET = {"disable_tqdm": True, "logging_steps": 1000}
INSTRUCTIONS = {"alpha": "Reverse the word.", "beta": "Sort the letters.", "gamma": "Uppercase the word."}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every entry under `roots` (hidden ones too): sha256 of each file, and a marker for each folder and link."""
    entries = {}
    for root in roots:
        if not root.exists():
            entries[str(root)] = "absent"
            continue
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                entries[os.path.join(folder, name)] = "folder"
            for name in files:
                path = Path(folder, name)
                entries[str(path)] = "link" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


class LetterEmbedder(InstructionEmbedder):
    """Embeddings without a model: counts of eight letters in the text, normalised. A fixed, independent function."""

    def __init__(self):
        self.model_id, self.prefix = "letter-counts", ""

    def embed(self, texts):
        counts = torch.tensor([[1.0 + text.lower().count(c) for c in "abcdefgh"] for text in texts])
        return counts / counts.norm(dim=1, keepdim=True)


def run_child(code: str, *args, expect_exit: int | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter at the repository root (so `tests.conftest` imports)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if expect_exit is not None:
        assert result.returncode == expect_exit, result.stdout + result.stderr
    return result


def same_state(model, reference: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# describe-experts


@pytest.fixture
def described(tmp_path):
    """Three experts with gates and instructions, in tmp_path/experts."""
    base = make_base(seed=3)
    root = tmp_path / "experts"
    dirs = [
        make_expert(root, base, name, r=2, seed=i, instruction=text)
        for i, (name, text) in enumerate(INSTRUCTIONS.items())
    ]
    return base, dirs


def truncate_weights(directory: Path) -> str:
    data = (directory / "glider_expert.safetensors").read_bytes()
    (directory / "glider_expert.safetensors").write_bytes(data[: len(data) // 2])
    return r"glider_expert\.safetensors is not a readable safetensors file"


def nan_gate(directory: Path) -> str:
    tensors = load_file(directory / "glider_expert.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    save_file(tensors, directory / "glider_expert.safetensors")
    return rf"tensor '{re.escape(key)}' in glider_expert\.safetensors holds NaN"


def broken_adapter(directory: Path) -> str:
    (directory / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return r"adapter_model\.safetensors is not a readable safetensors file"


def torn_pair(directory: Path) -> str:
    """The state a kill between the two renames of an earlier description leaves: one file new, the other old."""
    old_weights = (directory / "glider_expert.safetensors").read_bytes()
    describe_experts([directory], instructions={directory.name: "A newer instruction."}, embedder=LetterEmbedder())
    (directory / "glider_expert.safetensors").write_bytes(old_weights)
    return r"glider_expert\.safetensors"


@pytest.mark.parametrize("corrupt", [truncate_weights, nan_gate, broken_adapter, torn_pair])
def test_describe_checks_every_expert_before_writing_any(described, corrupt):
    _, dirs = described
    message = corrupt(dirs[-1])  # the last expert: the earlier ones would be written first
    before = snapshot(dirs[0].parent)
    with pytest.raises(ValueError, match=message) as error:
        describe_experts(dirs, instructions={"alpha": "New alpha.", "beta": "New beta."}, embedder=LetterEmbedder())
    assert "gamma" in str(error.value)  # names the expert
    assert snapshot(dirs[0].parent) == before


def test_cli_describe_refuses_a_corrupt_expert_in_one_line_and_writes_nothing(described, capsys):
    _, dirs = described
    truncate_weights(dirs[-1])
    before = snapshot(dirs[0].parent)
    assert main(["describe-experts", *map(str, dirs), "--instruction", "alpha=New alpha."]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glider describe-experts: error: ")
    assert "gamma" in err[0] and "glider_expert.safetensors" in err[0]
    assert snapshot(dirs[0].parent) == before


@pytest.mark.parametrize("failing_write", [1, 2, 3, 4])
def test_describe_failing_while_writing_any_expert_changes_none(described, monkeypatch, failing_write):
    """A write that fails (disk full, say) at any expert leaves every expert, earlier ones included, as it was."""
    _, dirs = described
    before = snapshot(dirs[0].parent)
    real_save_file, calls = experts_module.save_file, []

    def save_file_or_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == failing_write:
            Path(filename).write_bytes(b"partial")  # what a full disk leaves
            raise OSError(28, "No space left on device")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(experts_module, "save_file", save_file_or_fail)
    monkeypatch.setattr(experts_module.Path, "write_text", _failing_write_text(failing_write - 3))
    with pytest.raises(OSError, match="No space left on device"):
        describe_experts(dirs, instructions={"alpha": "New alpha."}, embedder=LetterEmbedder())
    assert snapshot(dirs[0].parent) == before


def _failing_write_text(fail_at: int):
    """`Path.write_text` that fails on call number `fail_at` (never when `fail_at` < 1)."""
    real, calls = Path.write_text, []

    def write_text(self, data, *args, **kwargs):
        calls.append(self)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        return real(self, data, *args, **kwargs)

    return write_text


def test_describe_writes_every_expert_and_leaves_no_staging_files(described):
    base, dirs = described
    instructions = {"alpha": "New alpha.", "beta": "New beta."}
    gates_before = [load_file(d / "glider_expert.safetensors") for d in dirs]
    describe_experts(dirs, instructions=instructions, embedder=LetterEmbedder())
    expected_text = [instructions.get(d.name, INSTRUCTIONS[d.name]) for d in dirs]
    expected = LetterEmbedder().embed(expected_text)
    for directory, gates, text, embedding in zip(dirs, gates_before, expected_text, expected):
        assert sorted(p.name for p in directory.iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors", "glider_expert.json",
            "glider_expert.safetensors",
        ]  # fmt: skip
        expert = load_expert(directory)
        assert expert.instruction == text and expert.embedding_model == "letter-counts"
        assert torch.equal(expert.instruction_embedding, embedding)
        written = load_file(directory / "glider_expert.safetensors")
        assert all(torch.equal(written[key], gate) for key, gate in gates.items())
    GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1)


# One expert's two files


WRITE_AND_DIE = """
import os, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from modeling_glider.experts import write_expert_files

directory, kill_at = Path(sys.argv[1]), int(sys.argv[2])
real_replace, renames = os.replace, []

def replace(source, target):
    if len(renames) == kill_at:
        os._exit(3)  # killed: no cleanup runs
    renames.append(target)
    real_replace(source, target)

os.replace = replace
tensors = {key: value + 1 for key, value in load_file(directory / "glider_expert.safetensors").items()}
write_expert_files(directory, {"name": "solo", "instruction": "New."}, tensors)
"""


@pytest.mark.parametrize("kill_at", [0, 1, 2])
def test_one_expert_killed_between_its_renames_is_old_new_or_refused(tmp_path, kill_at):
    """Never a new gate file with an old instruction (or the reverse) read silently."""
    base = make_base(seed=2)
    directory = make_expert(tmp_path, base, "solo", r=2, seed=1, instruction="Old.", embedding=torch.ones(EMBED_DIM))
    old = load_expert(directory)
    run_child(WRITE_AND_DIE, directory, kill_at, expect_exit=3 if kill_at < 2 else 0)
    try:
        expert = load_expert(directory)
    except ValueError as error:
        assert "glider_expert.safetensors" in str(error) and "solo" in str(error)
        return
    assert expert.instruction in ("Old.", "New.")
    shift = 0 if expert.instruction == "Old." else 1
    assert torch.equal(expert.instruction_embedding, old.instruction_embedding + shift)
    assert all(torch.equal(expert.gates[path], gate + shift) for path, gate in old.gates.items())


# save_pretrained


def make_library(root: Path, seed: int) -> GliderT5ForConditionalGeneration:
    base = make_base(seed=seed)
    dirs = [make_expert(root, base, f"v{seed}_{i}", r=2, seed=10 * seed + i) for i in range(2)]
    return GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1)


@pytest.fixture
def saved_v1(tmp_path, tokenizer):
    """Model v1 saved in tmp_path/models/glider, with a tokenizer and a notes folder saved there beside it."""
    model = make_library(tmp_path / "experts", seed=1)
    target = tmp_path / "models" / "glider"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "notes").mkdir()
    (target / "notes" / "eval.txt").write_text("accuracy 0.5\n")
    return target, frozen_state(model)


SAVE_AND_DIE_IN_WEIGHTS = """
import os, sys
from pathlib import Path
import transformers.modeling_utils
from safetensors.torch import save
from modeling_glider import GliderT5ForConditionalGeneration
from tests.conftest import make_base, make_expert

experts, target = Path(sys.argv[1]), Path(sys.argv[2])
base = make_base(seed=2)
dirs = [make_expert(experts, base, f"v2_{i}", r=2, seed=20 + i) for i in range(2)]
model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1)

def write_half_then_die(tensors, filename, metadata=None):
    data = save(tensors, metadata=metadata)
    with open(filename, "wb") as file:
        file.write(data[: len(data) // 2])
        file.flush()
        os.fsync(file.fileno())
    print("killed while writing the weights", flush=True)
    os._exit(3)

transformers.modeling_utils.safe_save_file = write_half_then_die
model.save_pretrained(target)
"""


def test_save_pretrained_killed_halfway_through_the_weights_keeps_the_old_model(saved_v1, tmp_path):
    target, v1 = saved_v1
    before = snapshot(target)
    result = run_child(SAVE_AND_DIE_IN_WEIGHTS, tmp_path / "v2_experts", target, expect_exit=3)
    assert "killed while writing the weights" in result.stdout
    assert snapshot(target) == before
    assert same_state(GliderT5ForConditionalGeneration.from_pretrained(target), v1)


SAVE_AND_DIE_AT_RENAME = """
import os, sys
from pathlib import Path
from modeling_glider import GliderT5ForConditionalGeneration
from tests.conftest import make_base, make_expert

experts, target, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
base = make_base(seed=2)
dirs = [make_expert(experts, base, f"v2_{i}", r=2, seed=20 + i) for i in range(2)]
model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=1)
real, renames = {"replace": os.replace, "rename": os.rename}, []

def killing(kind):
    def rename(source, destination, **kwargs):
        if len(renames) == kill_at:
            os._exit(3)  # killed: no cleanup runs
        renames.append(destination)
        real[kind](source, destination, **kwargs)
    return rename

os.replace, os.rename = killing("replace"), killing("rename")
model.save_pretrained(target)
"""


def test_save_pretrained_killed_at_any_rename_leaves_a_whole_model(saved_v1, tmp_path):
    """Killed before each rename in turn: the target holds v1 or v2 whole; or, in the instant between the folder
    swap's two renames, the target is missing, v1 is whole in one folder beside it, and the next save names it."""
    target, v1 = saved_v1
    v2 = frozen_state(make_library(tmp_path / "v2_experts", seed=2))  # what the child builds
    kept = {k: v for k, v in snapshot(target).items() if "model.safetensors" not in k and "config.json" not in k}
    for kill_at in range(8):
        result = run_child(SAVE_AND_DIE_AT_RENAME, tmp_path / f"v2_experts_{kill_at}", target, kill_at)
        assert result.returncode in (0, 3), result.stderr
        if target.exists():
            model = GliderT5ForConditionalGeneration.from_pretrained(target)
            assert same_state(model, v1) or same_state(model, v2), kill_at
        else:
            beside = [p for p in target.parent.iterdir() if (p / "config.json").exists()]  # staged or set aside
            old = [p for p in beside if same_state(GliderT5ForConditionalGeneration.from_pretrained(p), v1)]
            assert len(old) == 1, beside
            assert {k.replace(str(old[0]), str(target)): v for k, v in snapshot(old[0]).items() if
                    k.replace(str(old[0]), str(target)) in kept} == kept  # fmt: skip
            with pytest.warns(UserWarning, match=re.escape(str(old[0]))):
                make_library(tmp_path / f"v3_experts_{kill_at}", seed=3).save_pretrained(target)
            break
        assert {k: v for k, v in snapshot(target).items() if k in kept} == kept  # the tokenizer and notes stay
        if result.returncode == 0:
            break
    else:
        pytest.fail("save_pretrained never finished")


def test_save_pretrained_failing_halfway_through_the_weights_changes_nothing(saved_v1, monkeypatch):
    target, v1 = saved_v1
    before = snapshot(target.parent)

    def write_half_then_fail(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", write_half_then_fail)
    model = make_library(target.parent.parent / "v2_experts", seed=2)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(target)
    assert snapshot(target.parent) == before  # no staging folder left beside it either
    assert same_state(GliderT5ForConditionalGeneration.from_pretrained(target), v1)


@pytest.mark.parametrize("shards", ["one file, then shards", "shards, then one file"])
def test_save_pretrained_over_a_model_keeps_other_files_and_drops_only_old_weights(tmp_path, tokenizer, shards):
    target = tmp_path / "models" / "glider"
    first, second = ("50GB", "20KB") if shards.startswith("one") else ("20KB", "50GB")
    make_library(tmp_path / "experts", seed=1).save_pretrained(target, max_shard_size=first)
    tokenizer.save_pretrained(target)
    (target / "notes").mkdir()
    (target / "notes" / "eval.txt").write_text("accuracy 0.5\n")
    others = {k: v for k, v in snapshot(target).items() if "tokeniz" in k or "notes" in k or "special" in k}
    assert len(others) >= 3

    v2 = make_library(tmp_path / "experts", seed=2)
    v2.save_pretrained(target, max_shard_size=second)
    assert sorted(p.name for p in target.parent.iterdir()) == ["glider"]  # no staging or old folder left
    assert {k: v for k, v in snapshot(target).items() if k in others} == others
    weights = sorted(p.name for p in target.iterdir() if p.name.startswith(("model.", "model-")))
    if second == "50GB":
        assert weights == ["model.safetensors"]
    else:
        assert "model.safetensors" not in weights and len(weights) > 2  # shards and their index only
    assert same_state(GliderT5ForConditionalGeneration.from_pretrained(target), frozen_state(v2))


def test_save_pretrained_into_the_working_directory(saved_v1, tmp_path, monkeypatch):
    """The working folder cannot be swapped for another one: the model files are still written completely first."""
    target, _ = saved_v1
    others = {k: v for k, v in snapshot(target).items() if "tokeniz" in k or "notes" in k}
    monkeypatch.chdir(target)
    v2 = make_library(tmp_path / "v2_experts", seed=2)
    v2.save_pretrained(".")
    assert Path.cwd() == target and Path("config.json").is_file()  # still working in the same, live folder
    assert sorted(p.name for p in target.parent.iterdir()) == ["glider"]
    assert not [p for p in target.iterdir() if p.name.startswith(".")]
    assert {k: v for k, v in snapshot(target).items() if k in others} == others
    assert same_state(GliderT5ForConditionalGeneration.from_pretrained(target), frozen_state(v2))


@pytest.mark.parametrize("rank", ["is_main_process=False", "a later rank of a distributed run"])
def test_save_pretrained_on_other_processes_writes_nothing(saved_v1, tmp_path, monkeypatch, rank):
    target, v1 = saved_v1
    before = snapshot(target.parent)
    model = make_library(tmp_path / "v2_experts", seed=2)
    if rank == "is_main_process=False":
        model.save_pretrained(target, is_main_process=False)
    else:
        monkeypatch.setattr(type(model), "should_save_on_this_rank", lambda self, is_main_process: False)
        model.save_pretrained(target)
    assert snapshot(target.parent) == before
    assert same_state(GliderT5ForConditionalGeneration.from_pretrained(target), v1)


# build, train-gates, train-expert, convert


def test_build_failing_while_saving_leaves_no_output(tmp_path, monkeypatch):
    base = make_base(seed=1)
    dirs = [make_expert(tmp_path / "experts", base, f"e{i}", r=2, seed=i) for i in range(2)]

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", fail)
    before = snapshot(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        build_library(base, dirs, tmp_path / "out" / "glider")
    assert snapshot(tmp_path) == before  # not even the parent folder is left


@pytest.fixture
def word_rows():
    return [{"input": "reverse the word apple", "target": "elppa"}] * 4


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_train_gates_failing_while_writing_leaves_the_expert_as_it_was(
    tmp_path, tokenizer, word_rows, monkeypatch, failing
):
    base = make_base(seed=1, vocab_size=len(tokenizer))
    expert = make_expert(tmp_path / "experts", base, "words", r=2, seed=1, instruction="Old.")
    before = snapshot(tmp_path / "experts")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "weights":
        monkeypatch.setattr(experts_module, "save_file", fail)
    else:
        monkeypatch.setattr(experts_module.Path, "write_text", _failing_write_text(1))
    with pytest.raises(OSError, match="No space left"):
        train_gates(base, expert, word_rows, tokenizer=tokenizer, instruction="New.", steps=1, trainer_args=QUIET)
    assert snapshot(tmp_path / "experts") == before


def test_train_gates_writes_a_matching_pair(tmp_path, tokenizer, word_rows):
    base = make_base(seed=1, vocab_size=len(tokenizer))
    expert = make_expert(tmp_path / "experts", base, "words", r=2, seed=1, instruction="Old.")
    train_gates(base, expert, word_rows, tokenizer=tokenizer, instruction="New.", steps=1, trainer_args=QUIET)
    assert sorted(p.name for p in expert.iterdir() if p.name.startswith(".")) == []
    meta = json.loads((expert / "glider_expert.json").read_text())
    digest = hashlib.sha256((expert / "glider_expert.safetensors").read_bytes()).hexdigest()
    assert meta["instruction"] == "New." and digest in meta.values()
    assert load_expert(expert).instruction == "New."


def test_train_expert_failing_while_writing_leaves_no_output(tmp_path, tokenizer, word_rows, monkeypatch):
    base = make_base(seed=1, vocab_size=len(tokenizer))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(experts_module, "save_file", fail)
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        train_expert(base, word_rows, tmp_path / "out" / "words", name="words", tokenizer=tokenizer, r=2,
                     target_modules=["q"], steps=1, gate_steps=1, trainer_args=QUIET)  # fmt: skip
    assert snapshot(tmp_path) == before


def best_pt(expert: Path, path: Path) -> Path:
    """A GLIDER `<task>_best.pt` made from an expert directory with safetensors and torch alone."""
    adapter, extra = load_file(expert / "adapter_model.safetensors"), load_file(expert / "glider_expert.safetensors")
    state = {}
    for key, tensor in adapter.items():
        module, matrix = re.match(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key).groups()
        state[f"base_model.model.{module}.lora_{matrix}.default.weight"] = tensor
        state[f"base_model.model.{module}.lora_gate.default"] = extra[f"gate.{module}"]
    torch.save(state, path)
    return path


@pytest.fixture
def checkpoints(tmp_path):
    base = make_base(seed=1)
    files = [best_pt(make_expert(tmp_path / "peft", base, f"task{i}", r=2, seed=i), tmp_path / f"task{i}_best.pt")
             for i in range(3)]  # fmt: skip
    return files


def corrupt_checkpoint(files, monkeypatch) -> tuple[type, str]:
    files[-1].write_bytes(files[-1].read_bytes()[:100])
    return ValueError, "task2_best.pt: not a readable tensor file"


def failing_writer(files, monkeypatch) -> tuple[type, str]:
    real, calls = convert_module.save_file, []

    def save_file_or_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # the third expert's adapter
            raise OSError(28, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(convert_module, "save_file", save_file_or_fail)
    return OSError, "No space left"


@pytest.mark.parametrize("fault", [corrupt_checkpoint, failing_writer])
@pytest.mark.parametrize("out", ["new", "existing"])
def test_convert_failing_at_a_later_expert_leaves_out_as_it_was(tmp_path, checkpoints, monkeypatch, fault, out):
    output = tmp_path / "library" / "experts"
    if out == "existing":
        convert_checkpoints(checkpoints[:1], output, names=["earlier"])
    error, message = fault(checkpoints, monkeypatch)
    before = snapshot(tmp_path / "library")
    with pytest.raises(error, match=message):
        convert_checkpoints(checkpoints, output)
    assert snapshot(tmp_path / "library") == before


def test_cli_convert_failing_at_a_later_expert_leaves_no_out(tmp_path, checkpoints, monkeypatch, capsys):
    corrupt_checkpoint(checkpoints, monkeypatch)
    before = snapshot(tmp_path)
    assert main(["convert", *map(str, checkpoints), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glider convert: error: ") and "task2_best.pt" in err[0]
    assert snapshot(tmp_path) == before


def test_convert_writes_all_experts_and_no_staging_folder(tmp_path, checkpoints):
    written = convert_checkpoints(checkpoints, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["task0", "task1", "task2"]
    assert [load_expert(d).name for d in written] == ["task0", "task1", "task2"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
