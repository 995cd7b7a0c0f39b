"""Train the bundled tiny Qwen3-MoE model and its byte-level BPE tokenizer on the bundled corpus.

Builds the corpus (scripts/build_corpus.py) when the training split is missing, trains on CPU
with fixed seeds, saves model and tokenizer to data/model/ with save_pretrained, then prints
the structure check of scripts/check_structure.py on the held-out data/sample.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
from build_corpus import DEFAULT_SAMPLE, DEFAULT_TRAIN, DOMAINS, build_corpus
from check_structure import check_structure, load_records
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "data" / "model"
SEED = 1234
EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<|bos|>"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenization), trained only on the training split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=512,
    )


def token_streams(records: list[dict], tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """One token stream per domain: documents joined by EOS, so every block is single-domain."""
    eos = tokenizer.eos_token_id
    streams = {}
    for domain in DOMAINS:
        texts = [r["text"] for r in records if r["domain"] == domain]
        ids: list[int] = []
        for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(eos)
        streams[domain] = torch.tensor(ids, dtype=torch.long)
    return streams


def sample_batch(
    streams: dict[str, torch.Tensor], per_domain: int, block: int, generator: torch.Generator
) -> torch.Tensor:
    rows = []
    for domain in DOMAINS:
        stream = streams[domain]
        starts = torch.randint(0, len(stream) - block, (per_domain,), generator=generator)
        rows.extend(stream[s : s + block] for s in starts.tolist())
    return torch.stack(rows)


def make_config(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,  # unused: every layer is MoE (decoder_sparse_step=1)
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def train(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    if args.rebuild_corpus or not args.train_data.exists():
        build_corpus(args.train_data, args.sample)
    records = read_jsonl(args.train_data)
    tokenizer = train_tokenizer([r["text"] for r in records], args.vocab)
    streams = token_streams(records, tokenizer)
    print("training tokens per domain:", {d: len(s) for d, s in streams.items()})

    config = make_config(tokenizer, args)
    model = Qwen3MoeForCausalLM(config)
    # transformers 5 picks grouped_mm experts here (~1.6x faster than the per-expert loop on CPU).
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    train_started = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        batch = sample_batch(streams, args.batch_per_domain, args.block, generator)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3f}", aux=f"{out.aux_loss.item():.3f}")
    train_seconds = time.perf_counter() - train_started

    model.eval()
    model.config.use_cache = True
    args.out.mkdir(parents=True, exist_ok=True)
    # The aux loss was for training; saved with it on, generate() would compute it every step.
    model.config.output_router_logits = False
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    info = {
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "seed": args.seed,
        "steps": args.steps,
        "tokens_per_step": args.batch_per_domain * len(DOMAINS) * args.block,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "parameters": n_params,
        "model_dir_bytes": size,
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(info, indent=2))

    report = check_structure(model, tokenizer, load_records(args.sample), seed=0)
    print(report.format())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-data", type=Path, default=DEFAULT_TRAIN)
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rebuild-corpus", action="store_true")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=1, help="1 is robust on a shared 2-core box")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--moe-intermediate", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-per-domain", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    train(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
