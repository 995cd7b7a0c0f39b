"""Structure check for the bundled model: held-out loss and routing specialization per domain.

Captures router decisions with a forward pre-hook on each `model.model.layers[i].mlp.experts`
module (its `top_k_index` argument), counts expert slots per sequence without padding, and
compares per-domain expert lift with a shuffled-domain-label baseline. Called at the end of
scripts/train_model.py and by tests/test_bundled_model.py; standalone it reads data/model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "data" / "model"
DEFAULT_SAMPLE = REPO / "data" / "sample.jsonl"
HOT_FACTOR = 2.0  # hot: share >= HOT_FACTOR / E
NEAR_DEAD_FACTOR = 0.1  # near-dead: share < NEAR_DEAD_FACTOR / E


@dataclass
class StructureReport:
    num_experts: int
    top_k: int
    layers: list[int]
    domains: list[str]
    sequences: dict[str, int]
    tokens: dict[str, int]
    loss: dict[str, float]  # mean next-token cross-entropy, nats per predicted token
    lift: dict[int, dict[str, list[float]]]  # layer -> domain -> lift per expert
    shuffled_lift: dict[int, dict[str, list[float]]]
    share: dict[int, list[float]]  # layer -> share per expert over all tokens
    seed: int

    def max_lift(self, shuffled: bool = False) -> dict[int, dict[str, tuple[int, float]]]:
        """layer -> domain -> (expert, lift) of the expert with the highest lift."""
        table = self.shuffled_lift if shuffled else self.lift
        out: dict[int, dict[str, tuple[int, float]]] = {}
        for layer, by_domain in table.items():
            out[layer] = {}
            for domain, lifts in by_domain.items():
                expert = max(range(len(lifts)), key=lifts.__getitem__)
                out[layer][domain] = (expert, lifts[expert])
        return out

    def best(self) -> tuple[int, str, int, float, float]:
        """(layer, domain, expert, lift, shuffled max lift for that layer and domain)."""
        real, shuffled = self.max_lift(), self.max_lift(shuffled=True)
        layer, domain = max(
            ((layer, domain) for layer in real for domain in real[layer]),
            key=lambda key: real[key[0]][key[1]][1],
        )
        expert, lift = real[layer][domain]
        return layer, domain, expert, lift, shuffled[layer][domain][1]

    def hot_experts(self, factor: float = HOT_FACTOR) -> list[tuple[int, int, float]]:
        return [
            (layer, expert, s)
            for layer, shares in self.share.items()
            for expert, s in enumerate(shares)
            if s >= factor / self.num_experts
        ]

    def near_dead_experts(self, factor: float = NEAR_DEAD_FACTOR) -> list[tuple[int, int, float]]:
        return [
            (layer, expert, s)
            for layer, shares in self.share.items()
            for expert, s in enumerate(shares)
            if s < factor / self.num_experts
        ]

    def format(self) -> str:
        lines = [
            "held-out loss per domain (nats/token)",
            f"{'domain':<14}{'seqs':>6}{'tokens':>9}{'loss':>8}",
        ]
        for d in self.domains:
            lines.append(f"{d:<14}{self.sequences[d]:>6}{self.tokens[d]:>9}{self.loss[d]:>8.3f}")
        real, shuffled = self.max_lift(), self.max_lift(shuffled=True)
        lines += [
            "",
            f"max expert lift per layer and domain (E={self.num_experts}, top-{self.top_k}; "
            f"uniform = 1.0): real [expert] / shuffled labels (seed {self.seed})",
            f"{'layer':<7}" + "".join(f"{d:>22}" for d in self.domains),
        ]
        for layer in self.layers:
            cells = []
            for d in self.domains:
                expert, lift = real[layer][d]
                cells.append(f"{lift:6.2f} [e{expert:<2}] / {shuffled[layer][d][1]:5.2f}")
            lines.append(f"{layer:<7}" + "".join(f"{c:>22}" for c in cells))
        layer, domain, expert, lift, base = self.best()
        lines += [
            "",
            f"strongest: layer {layer}, domain {domain}, expert {expert}: lift {lift:.2f} "
            f"(shuffled-label max {base:.2f})",
            "",
            f"hot experts (share >= {HOT_FACTOR:g}/E): "
            + (", ".join(f"L{ly}e{e} {s:.3f}" for ly, e, s in self.hot_experts()) or "none"),
            f"near-dead experts (share < {NEAR_DEAD_FACTOR:g}/E): "
            + (", ".join(f"L{ly}e{e} {s:.4f}" for ly, e, s in self.near_dead_experts()) or "none"),
        ]
        return "\n".join(lines)


def load_records(path: Path = DEFAULT_SAMPLE, per_domain: int | None = None) -> list[dict]:
    """Read a JSONL corpus; keep the first per_domain records of each domain when given."""
    records, kept = [], {}
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            n = kept.get(rec["domain"], 0)
            if per_domain is None or n < per_domain:
                records.append(rec)
                kept[rec["domain"]] = n + 1
    return records


def moe_layers(model: torch.nn.Module) -> list[int]:
    return [
        i for i, layer in enumerate(model.model.layers) if hasattr(getattr(layer, "mlp", None), "experts")
    ]


@contextmanager
def expert_choices(model: torch.nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Collect each MoE layer's top_k_index ([tokens, k]) per forward; hooks removed on exit."""
    buffers: dict[int, list[torch.Tensor]] = {i: [] for i in moe_layers(model)}
    handles = []

    def make_hook(sink: list[torch.Tensor]):
        def hook(module, args):
            sink.append(args[1].detach())

        return hook

    try:
        for i, sink in buffers.items():
            handles.append(model.model.layers[i].mlp.experts.register_forward_pre_hook(make_hook(sink)))
        yield buffers
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


@torch.no_grad()
def measure(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: expert slot counts [n, layers, E], summed token loss [n], predicted tokens [n]."""
    layers = moe_layers(model)
    num_experts = model.config.num_experts
    counts = torch.zeros(len(texts), len(layers), num_experts, dtype=torch.long)
    loss_sum = torch.zeros(len(texts), dtype=torch.float64)
    predicted = torch.zeros(len(texts), dtype=torch.long)
    model.eval()
    with expert_choices(model) as buffers:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
            )
            target_mask = (mask[:, 1:] * mask[:, :-1]).to(token_loss.dtype)
            rows = slice(start, start + ids.shape[0])
            loss_sum[rows] = (token_loss * target_mask).sum(dim=1).double()
            predicted[rows] = target_mask.sum(dim=1).long()
            for j, layer in enumerate(layers):
                index = buffers[layer].pop().view(ids.shape[0], ids.shape[1], -1)
                onehot = torch.nn.functional.one_hot(index, num_experts).sum(dim=2)  # [b, s, E]
                counts[rows, j] = (onehot * mask[..., None]).sum(dim=1)
    return counts, loss_sum, predicted


def lift_by_domain(counts: torch.Tensor, labels: Sequence[str], domains: Sequence[str]) -> torch.Tensor:
    """[domains, layers, E] lift = share of expert slots within domain x E."""
    num_experts = counts.shape[-1]
    out = torch.zeros(len(domains), counts.shape[1], num_experts, dtype=torch.float64)
    for i, domain in enumerate(domains):
        rows = torch.tensor([label == domain for label in labels])
        per_domain = counts[rows].sum(dim=0).double()
        out[i] = per_domain / per_domain.sum(dim=-1, keepdim=True).clamp(min=1) * num_experts
    return out


def check_structure(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 256,
) -> StructureReport:
    """Run records through the model and summarise loss and routing per `domain` label."""
    texts = [r["text"] for r in records]
    labels = [r["domain"] for r in records]
    domains = sorted(set(labels))
    layers = moe_layers(model)
    counts, loss_sum, predicted = measure(model, tokenizer, texts, batch_size, max_length)

    generator = torch.Generator().manual_seed(seed)
    shuffled = [labels[i] for i in torch.randperm(len(labels), generator=generator).tolist()]
    real_lift = lift_by_domain(counts, labels, domains)
    base_lift = lift_by_domain(counts, shuffled, domains)
    total = counts.sum(dim=0).double()
    share = total / total.sum(dim=-1, keepdim=True)

    def per_domain(values: torch.Tensor) -> dict[str, float]:
        return {d: float(values[torch.tensor([x == d for x in labels])].sum()) for d in domains}

    loss_totals, token_totals = per_domain(loss_sum), per_domain(predicted.double())
    return StructureReport(
        num_experts=model.config.num_experts,
        top_k=model.config.num_experts_per_tok,
        layers=layers,
        domains=domains,
        sequences={d: labels.count(d) for d in domains},
        tokens={d: int(token_totals[d]) for d in domains},
        loss={d: loss_totals[d] / max(token_totals[d], 1.0) for d in domains},
        lift={
            layer: {d: real_lift[i, j].tolist() for i, d in enumerate(domains)}
            for j, layer in enumerate(layers)
        },
        shuffled_lift={
            layer: {d: base_lift[i, j].tolist() for i, d in enumerate(domains)}
            for j, layer in enumerate(layers)
        },
        share={layer: share[j].tolist() for j, layer in enumerate(layers)},
        seed=seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_SAMPLE)
    parser.add_argument("--per-domain", type=int, default=None, help="first N records of each domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    if not args.model.is_dir() or not args.data.is_file():
        print(
            f"error: need a model folder and a JSONL file, got {args.model} and {args.data}", file=sys.stderr
        )
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    report = check_structure(model, tokenizer, load_records(args.data, args.per_domain), seed=args.seed)
    print(report.format())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
