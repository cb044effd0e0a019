"""`glider demo`: build a small GliderT5 from LoRA experts made on the spot, save it, load it back through
`AutoModel`, and show which experts each query used. The weights are random, so the answers are noise; the
routing is the point."""

import io
import tempfile
from pathlib import Path

import torch

EXPERTS = {
    "reverse": "Reverse the letters of the given word and answer with the reversed word.",
    "sort": "Sort the letters of the given word alphabetically and answer with the sorted letters.",
    "uppercase": "Rewrite the given word in capital letters.",
}
QUERIES = {"reverse": "reverse the word apple", "sort": "sort the letters of banana", "uppercase": "uppercase cherry"}


def _tokenizer(directory: Path):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    text = list(EXPERTS.values()) + list(QUERIES.values())
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 10), model_writer=model, vocab_size=48, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (directory / "spiece.model").write_bytes(model.getvalue())
    return T5Tokenizer.from_pretrained(directory, extra_ids=0)


def _experts(base, directory: Path, embedding_dim: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    from .experts import routable_linears, save_expert_files

    dirs = []
    for index, (name, instruction) in enumerate(EXPERTS.items()):
        torch.manual_seed(index)
        peft_model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=4, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"])
        )
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                torch.nn.init.normal_(param, std=0.05)
        peft_model.save_pretrained(directory / name)
        base = peft_model.unload()
        gates = {path: torch.randn(linear.in_features) for path, linear in routable_linears(base).items()}
        save_expert_files(directory / name, name, instruction, gates, torch.eye(embedding_dim)[index])
        dirs.append(directory / name)
    return dirs


def run_demo(out_dir: str | Path = "glider-demo") -> None:
    from transformers import AutoModel, T5Config, T5ForConditionalGeneration, pipeline

    from . import GliderT5ForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tokenizer = _tokenizer(scratch)
        torch.manual_seed(0)
        base = T5ForConditionalGeneration(
            T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     feed_forward_proj="gated-gelu", decoder_start_token_id=0)
        ).eval()  # fmt: skip
        dirs = _experts(base, scratch, embedding_dim=len(EXPERTS))
        model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=10.0)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    model = AutoModel.from_pretrained(out_dir / "model")
    generator = pipeline("text2text-generation", model=model, tokenizer=tokenizer)
    names = model.config.expert_names
    print(f"GliderT5 with {len(names)} experts {names}, saved to {out_dir / 'model'} and loaded back with AutoModel.")
    for task, query in QUERIES.items():
        u = torch.eye(len(EXPERTS))[names.index(task)][None]
        answer = generator(query, instruction_embeddings=u, max_new_tokens=8)[0]["generated_text"]
        inputs = tokenizer(query, return_tensors="pt")
        usage = model(
            **inputs,
            decoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
            instruction_embeddings=u,
            output_routing=True,
        )
        usage = usage.routing.expert_usage(len(names), 1)[0]
        shares = ", ".join(f"{n} {w:.0%}" for n, w in sorted(zip(names, usage.tolist()), key=lambda p: -p[1]))
        print(f"{query!r} -> {answer!r}   experts used: {shares}")
