"""Build the tutorial notebooks in notebooks/ from the cell sources below, outputs cleared.

The notebooks are authored here as Python so that a review reads plain code; run
`python scripts/make_notebooks.py` after editing and commit both this file and the .ipynb
files. tests/test_notebooks.py executes every notebook and checks none is committed with
outputs.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "notebooks"
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}

Cell = tuple[str, str]  # ("md" | "code", source)


def md(text: str) -> Cell:
    return ("md", textwrap.dedent(text).strip())


def code(text: str) -> Cell:
    return ("code", textwrap.dedent(text).strip())


# The bundled model and corpus live in data/ beside the (editable) package, so the paths
# do not depend on the directory the notebook runs in; every run goes into a temp folder.
SETUP = code(
    """
    import json
    import tempfile
    import warnings
    from pathlib import Path

    import pandas as pd
    import torch
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import routescope as rs
    from routescope import plots
    from routescope.commands.inputs import bundled_corpus, bundled_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    pd.set_option("display.precision", 4)

    MODEL_DIR, CORPUS = bundled_model(), bundled_corpus()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    records = [json.loads(line) for line in CORPUS.open(encoding="utf-8") if line.strip()]
    texts_by_domain = {}
    for r in records:
        texts_by_domain.setdefault(r["domain"], []).append(r["text"])

    WORK = Path(tempfile.mkdtemp(prefix="routescope-notebook-"))  # runs go here, not into the repo
    print(f"{model.config.model_type}: {model.config.num_hidden_layers} layers, "
          f"{model.config.num_experts} experts, top-{model.config.num_experts_per_tok}")
    print({d: len(t) for d, t in texts_by_domain.items()}, "held-out texts; runs in", WORK)
    """
)

RECORD_BY_DOMAIN = code(
    '''
    def record_by_domain(model, out_dir, per_domain=12, max_length=128, batch_size=4, **options):
        """Record `per_domain` held-out texts of every domain, labelled with their domain."""
        with rs.record(model, out_dir, **options) as rec, torch.no_grad():
            for domain, texts in sorted(texts_by_domain.items()):
                rec.set_labels(domain=domain)  # applies to the forwards that follow
                for i in range(0, per_domain, batch_size):
                    enc = tokenizer(texts[i : min(i + batch_size, per_domain)], return_tensors="pt", padding=True,
                                    truncation=True, max_length=max_length)
                    model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return rs.open_run(out_dir)
    '''
)


QUICKSTART: list[Cell] = [
    md(
        """
        # routescope quickstart

        Record every routing decision of a Mixture-of-Experts model, open the run, and check
        its routing health: how evenly the experts share the load, and which experts are dead
        (never chosen) or hot (chosen far more than their fair share).

        We use the tiny Qwen3-MoE model bundled with routescope (`data/model`) and its held-out
        corpus (`data/sample.jsonl`, four domains: code, math, multilingual, prose). Everything
        runs offline on a CPU in about a minute.
        """
    ),
    SETUP,
    md(
        """
        ## 1. Record

        `rs.record(model, out_dir, labels=...)` adds hooks to every router, and writes one row
        per (token, MoE layer, slot) to Parquet while the model runs. `rec.set_labels(...)`
        changes the labels of the forwards that follow, so each token carries the domain of
        the text it came from. The hooks are removed when the block ends.
        """
    ),
    code(
        """
        run_dir = WORK / "quickstart"
        with rs.record(model, run_dir, labels={"domain": "unset"}) as rec, torch.no_grad():
            for domain, texts in sorted(texts_by_domain.items()):
                rec.set_labels(domain=domain)
                for i in range(0, 12, 4):  # 12 texts per domain, 4 per batch
                    enc = tokenizer(texts[i : i + 4], return_tensors="pt", padding=True,
                                    truncation=True, max_length=128)
                    model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        print(sorted(p.name for p in run_dir.iterdir()))
        """
    ),
    md(
        """
        ## 2. Open the run

        `rs.open_run` returns a `Run`. In a notebook it renders as a summary of its manifest
        and the headline metrics. `run.sql(...)` queries the `tokens` and `routing` views with
        DuckDB and returns a DataFrame; padding tokens are never recorded.
        """
    ),
    code(
        """
        run = rs.open_run(run_dir)
        run
        """
    ),
    code(
        """
        run.sql(\"\"\"
            SELECT domain, count(*) AS tokens, count(DISTINCT seq_id) AS sequences
            FROM tokens GROUP BY domain ORDER BY domain
        \"\"\")
        """
    ),
    code(
        """
        run.sql("SELECT * FROM routing ORDER BY seq_id, pos, layer, slot LIMIT 6")
        """
    ),
    md(
        """
        ## 3. Load balance

        `run.balance()` gives one row per MoE layer. `cv` (coefficient of variation of the
        expert loads) and `max_violation` (how far the busiest expert is above the mean, as a
        fraction of the mean) are 0 for a perfectly even layer; `balancedness` (mean / max
        load) and `norm_entropy` (entropy of the load shares over ln E) are 1. A layer whose
        `max_violation` is 1.0 sends its busiest expert twice the average load.
        """
    ),
    code(
        """
        balance = run.balance()
        balance
        """
    ),
    code(
        """
        plots.balance_figure(balance)
        """
    ),
    md(
        """
        The heatmap shows every expert of every layer at once, as lift = share × E: white is a
        fair share, red more, blue less (log scale).
        """
    ),
    code(
        """
        load = run.expert_load()
        plots.load_heatmap(load, value="lift")
        """
    ),
    md(
        """
        ## 4. Dead and hot experts

        A dead expert received no token at all. How much that means depends on how many tokens
        were seen: a uniform router misses one given expert for all T tokens with probability
        (1 − k/E)^T, astronomically small for the few thousand tokens here, but not for a
        handful of decode tokens. A hot expert has at least twice the uniform share 1/E;
        `ratio` says how many times the uniform share it gets.
        """
    ),
    code(
        """
        dead = run.dead_experts()
        hot = run.hot_experts(factor=2.0)
        T, E, k = run.manifest["tokens"], run.num_experts(run.moe_layers[0]), run.top_k(run.moe_layers[0])
        print(f"{len(dead)} dead and {len(hot)} hot experts over {T} tokens; "
              f"P(a given expert gets no token | uniform router) = {(1 - k / E) ** T:.1e}")
        hot.sort_values("ratio", ascending=False).head(10)
        """
    ),
    md(
        """
        The bars show one layer, the least balanced one: the dashed line is the uniform share,
        red bars are hot experts and grey bars dead ones.
        """
    ),
    code(
        """
        worst = int(balance.sort_values("cv", ascending=False)["layer"].iloc[0])
        plots.expert_bars(load, layer=worst)
        """
    ),
    md(
        """
        Every metric method takes `where=`, a SQL predicate over the `tokens` view, so the same
        question can be asked of one slice of the data:
        """
    ),
    code(
        """
        by_domain = pd.concat(
            [run.balance(where=f"domain = '{d}'").assign(domain=d) for d in sorted(texts_by_domain)]
        )
        by_domain.pivot(index="layer", columns="domain", values="cv")
        """
    ),
    md(
        """
        Next: `02_load_balance` (layers, prefill vs decode, steps), `03_entanglement_and_specialization`,
        `04_super_experts`, `05_compare_runs`.
        """
    ),
]


LOAD_BALANCE: list[Cell] = [
    md(
        """
        # Load balance: over layers, phases and steps

        An MoE layer is only as fast as its busiest expert, and an expert that is never chosen
        is dead weight. This notebook records the bundled model twice — a forward pass over
        held-out text, and `generate` on short prompts — and looks at the load per layer, per
        phase (prefill vs decode) and per forward step.
        """
    ),
    SETUP,
    md(
        """
        ## What the metrics mean

        For one MoE layer with E experts and top-k routing, L_e is the number of routing slots
        that went to expert e (every one of the k slots of a token counts), N = Σ L_e, the
        share s_e = L_e / N and the mean load m = N / E.

        | metric | formula | even load | read it as |
        |---|---|---|---|
        | `cv` | std(L) / m | 0 | spread of the loads relative to the mean |
        | `max_violation` | (max L − m) / m | 0 | how overloaded the busiest expert is (MaxVio) |
        | `balancedness` | m / max L | 1 | the fraction of peak throughput an expert-parallel layer reaches |
        | `norm_entropy` | −Σ s ln s / ln E | 1 | 1 = all experts used equally, 0 = one expert takes all |
        | `aux_loss` | E · Σ (L_e / T) · P̄_e | k (1 for top-1) | the Switch / Mixtral load-balancing loss; needs `router_stats=True` |

        `aux_loss` also uses the router's probabilities P̄_e, so it is recorded only with
        `router_stats=True`.
        """
    ),
    md("## 1. Prefill: a forward pass over held-out text, with router statistics"),
    code(
        """
        prefill_dir = WORK / "prefill"
        with rs.record(model, prefill_dir, router_stats=True) as rec, torch.no_grad():
            for domain, texts in sorted(texts_by_domain.items()):
                rec.set_labels(domain=domain)
                for i in range(0, 8, 4):
                    enc = tokenizer(texts[i : i + 4], return_tensors="pt", padding=True,
                                    truncation=True, max_length=128)
                    model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        run = rs.open_run(prefill_dir)
        balance = run.balance()
        balance
        """
    ),
    code(
        """
        plots.balance_figure(balance)
        """
    ),
    code(
        """
        plots.load_heatmap(run.expert_load(), value="share")
        """
    ),
    md(
        """
        ## 2. Phases: prefill vs decode with `generate`

        During `generate` the first forward reads the whole prompt (phase `prefill`), then
        each following forward adds one token per sequence (phase `decode`). Decode tokens are
        the model's own predictions, so their routing can differ from the prompt's.
        Generation needs left padding so every prompt ends at the same position.
        """
    ),
    code(
        """
        tokenizer.padding_side = "left"
        prompts = [texts_by_domain[d][i][:200] for d in sorted(texts_by_domain) for i in range(2)]
        gen_dir = WORK / "generate"
        with rs.record(model, gen_dir, labels={"source": "generate"}) as rec, torch.no_grad():
            enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=48)
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        tokenizer.padding_side = "right"
        gen = rs.open_run(gen_dir)
        gen.sql("SELECT phase, count(*) AS tokens, count(DISTINCT step) AS forwards FROM tokens GROUP BY phase")
        """
    ),
    md(
        """
        Compare the two phases with the same figures used to compare two runs: prefill is run
        A (dashed), decode is run B (solid). The figure builders take the two sides in one
        frame, with `_a` and `_b` columns (the shape `rs.compare(a, b)` returns). Decode has
        far fewer tokens, so part of any difference is sampling noise; the heatmap shows which
        experts gain or lose load.
        """
    ),
    code(
        """
        def side_by_side(a, b, keys):
            \"\"\"Two metric frames as one, columns suffixed _a and _b.\"\"\"
            return a.merge(b, on=keys, how="outer", suffixes=("_a", "_b"))

        phases = side_by_side(gen.balance(where="phase = 'prefill'"), gen.balance(where="phase = 'decode'"), ["layer"])
        phases[["layer", "tokens_a", "tokens_b", "cv_a", "cv_b", "norm_entropy_a", "norm_entropy_b"]]
        """
    ),
    code(
        """
        plots.balance_change_figure(phases)
        """
    ),
    code(
        """
        load_phases = side_by_side(gen.expert_load(where="phase = 'prefill'"),
                                   gen.expert_load(where="phase = 'decode'"), ["layer", "expert"])
        plots.load_delta_heatmap(load_phases)
        """
    ),
    md(
        """
        ## 3. Steps: load per forward pass

        Each forward pass is a `step`. The balance of a single step tells whether the load is
        steady over time or jumps around. With T tokens each choosing k of E experts, even a
        perfectly uniform router shows cv ≈ √((E − k) / (k · T)) from sampling noise alone, so
        small decode steps always look unbalanced: compare each step with that line.
        """
    ),
    code(
        """
        steps = gen.sql("SELECT step, any_value(phase) AS phase, count(*) AS tokens FROM tokens GROUP BY step ORDER BY step")
        per_step = pd.concat(
            [gen.balance(where=f"step = {int(s)}").assign(step=int(s), phase=p)
             for s, p in zip(steps["step"], steps["phase"])]
        )
        first = gen.moe_layers[0]
        E, k = gen.num_experts(first), gen.top_k(first)
        per_step = per_step.merge(steps[["step", "tokens"]].rename(columns={"tokens": "step_tokens"}), on="step")
        per_step["uniform_cv"] = ((E - k) / (k * per_step["step_tokens"])) ** 0.5
        per_step.groupby("phase")[["cv", "uniform_cv", "norm_entropy"]].mean()
        """
    ),
    code(
        """
        import plotly.express as px

        mean_over_layers = per_step.groupby(["step", "phase"], as_index=False)[["cv", "uniform_cv"]].mean()
        fig = px.line(mean_over_layers.melt(id_vars=["step", "phase"], var_name="series", value_name="value"),
                      x="step", y="value", color="series", markers=True, template=plots.TEMPLATE,
                      title="cv per forward step (mean over MoE layers) vs the uniform-router noise level")
        fig.update_yaxes(title="cv", rangemode="tozero")
        fig
        """
    ),
    md(
        """
        A step whose cv sits close to the uniform line is as balanced as its few tokens allow;
        a step far above it concentrates its tokens on a few experts. In serving, this is the
        per-batch imbalance that expert-parallel systems (EPLB) try to smooth by replicating
        the hot experts.
        """
    ),
]


ENTANGLEMENT: list[Cell] = [
    md(
        """
        # Entanglement and specialization

        Two questions about *where* tokens go:

        * **Entanglement** — does the expert a token uses in one layer predict the expert it
          uses in the next? If routing were independent across layers, the mutual information
          (MI) between consecutive top-1 experts would be close to the shuffled baseline.
        * **Specialization** — do experts prefer some domains or some tokens? `lift` = share
          within a domain × E: 1.0 is a fair share, 4.0 is four times the fair share.
        """
    ),
    SETUP,
    RECORD_BY_DOMAIN,
    code(
        """
        run = record_by_domain(model, WORK / "by_domain", per_domain=12)
        run
        """
    ),
    md(
        """
        ## 1. Mutual information across layers

        Blue bars: MI (bits) between each token's top-1 expert in a layer and in the next MoE
        layer. Grey bars: the same after shuffling the second layer's experts across tokens —
        what the plug-in estimate gives from finite data alone. Only the gap above grey is
        structure. `top1_predictability` is the accuracy of guessing the next expert from the
        current one by the most common transition.
        """
    ),
    code(
        """
        ent = run.entanglement()
        ent
        """
    ),
    code(
        """
        plots.entanglement_figure(ent)
        """
    ),
    md(
        """
        The transition matrix of the most entangled pair of layers: row a, column b is the
        probability that a token whose top-1 expert is a moves to b. Rows with one bright cell
        are near-deterministic hand-offs.
        """
    ),
    code(
        """
        top = ent.sort_values("mutual_info_bits", ascending=False).iloc[0]
        a, b = int(top["layer"]), int(top["next_layer"])
        trans = run.transition(a, b)
        plots.transition_heatmap(trans, a, b, run.num_experts(a), run.num_experts(b))
        """
    ),
    md(
        """
        Within a layer, `coactivation(layer)` counts pairs of experts chosen for the same token
        (P(b | a)): experts that are nearly always chosen together behave like one wide expert.
        """
    ),
    code(
        """
        plots.coactivation_heatmap(run.coactivation(a), run.num_experts(a), layer=a)
        """
    ),
    md(
        """
        ## 2. Pathways

        A pathway is the sequence of top-1 experts one token takes through all MoE layers.
        The Sankey draws the most frequent ones; a few thick bands mean tokens follow a few
        fixed routes.
        """
    ),
    code(
        """
        paths = run.pathways(top=20)
        paths.head(10)
        """
    ),
    code(
        """
        plots.pathway_sankey(paths, run.moe_layers)
        """
    ),
    md(
        """
        ## 3. Per-domain lift

        `run.specialization(by="domain")` gives, for every domain, layer and expert, the share
        of that domain's routing slots the expert receives and its lift. Red cells are experts
        a domain prefers.
        """
    ),
    code(
        """
        spec = run.specialization(by="domain")
        spec.sort_values("lift", ascending=False).head(10)
        """
    ),
    code(
        """
        spread = spec.groupby("layer")["lift"].std().idxmax()  # the layer whose lifts differ most
        plots.specialization_heatmap(spec, "domain", layer=int(spread))
        """
    ),
    md(
        """
        ## 4. Vocabulary specialization and repetition

        Some experts serve particular tokens (punctuation, digits, indentation) rather than a
        domain. `vocab_specialization()` gives, per layer and token id, the expert that token
        goes to most often (`top_expert`), the fraction of its occurrences that go there
        (`top_share`) and the lift over the uniform k/E. The table lists the most
        concentrated frequent tokens of the last MoE layer. `repetition_rate()` is the fraction of consecutive tokens in a
        sequence whose top-1 expert is the same. A uniform router gives 1/E (the grey marks);
        `marginal_baseline` (Σ p_e², p_e the top-1 shares) is what this layer's own uneven
        load gives by chance. Mixtral's authors found rates well above chance: consecutive
        tokens often share experts.
        """
    ),
    code(
        """
        vocab = run.vocab_specialization(min_occurrences=20)  # tokens seen at least 20 times
        vocab = vocab.assign(token=[repr(tokenizer.decode([int(t)])) for t in vocab["token_id"]])
        last = run.moe_layers[-1]
        vocab[vocab["layer"] == last].sort_values(["top_share", "occurrences"], ascending=False).head(12)
        """
    ),
    code(
        """
        rep = run.repetition_rate()
        plots.repetition_figure(rep)
        """
    ),
]


SUPER_EXPERTS: list[Cell] = [
    md(
        """
        # Super Experts

        A *Super Expert* (Su et al. 2025, arXiv 2507.23279) is one of the very few experts whose
        down-projection produces extreme output values; those outliers create the *massive
        activations* in the residual stream that attention sinks depend on, so pruning a
        single Super Expert can wreck a model while pruning an ordinary one barely matters.

        `rs.find_super_experts(model, batches)` runs a short calibration, records for every
        routed and shared expert the largest |output| of its down-projection, and flags an
        expert when that value is above the 99.5th percentile of all experts **and** above a
        tenth of the largest, in the early layers where massive activations are built (the
        first 75 % of the decoder layers).
        """
    ),
    SETUP,
    md(
        """
        ## 1. Calibration on the bundled model

        Two batches of held-out texts, two per domain, as calibration data: each batch is a
        dict of model inputs (a list of strings works too, with `tokenizer=`). The result has
        one row per expert, largest output first; `attrs["thresholds"]` holds the thresholds
        that were applied and the layers searched. Even a tiny, briefly trained model can
        grow an expert whose output towers over the rest: the scatter shows how far every
        expert is from the two dashed thresholds.
        """
    ),
    code(
        """
        calibration = [t[:400] for d in sorted(texts_by_domain) for t in texts_by_domain[d][:2]]
        batches = []
        for i in range(0, len(calibration), 4):
            enc = tokenizer(calibration[i : i + 4], return_tensors="pt", padding=True, truncation=True, max_length=96)
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        found = rs.find_super_experts(model, batches, progress=False)
        th = found.attrs["thresholds"]
        print({k: th[k] for k in ("percentile_threshold", "max_threshold", "layers")})
        found.head(8)
        """
    ),
    code(
        """
        plots.super_expert_scatter(found, th["percentile_threshold"], th["max_threshold"])
        """
    ),
    md(
        """
        The same pass measures the residual stream after every decoder layer. A *massive
        activation* (Sun et al. 2024) is a value above 100 and above 1000 × the median |h|;
        in large models they appear right after the layer that holds a Super Expert.
        """
    ),
    code(
        """
        hidden = pd.DataFrame(found.attrs["hidden_stats"])
        plots.massive_activation_figure(hidden)
        """
    ),
    md(
        """
        ## 2. A planted Super Expert

        To see the detector fire, build a tiny Qwen3-MoE model from a config (random weights,
        4 layers, 8 experts) and plant a Super Expert: scale the down-projection of expert 5 in
        layer 1 by 300. Its outputs become two orders of magnitude larger than any other
        expert's — the signature the detector looks for.
        """
    ),
    code(
        """
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        torch.manual_seed(0)
        config = Qwen3MoeConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
            max_position_embeddings=256, pad_token_id=0,
        )
        tiny = Qwen3MoeForCausalLM(config).eval()
        PLANTED = (1, 5)
        with torch.no_grad():  # fused experts: down_proj is one tensor indexed by expert
            tiny.model.layers[PLANTED[0]].mlp.experts.down_proj[PLANTED[1]] *= 300.0

        gen = torch.Generator().manual_seed(0)
        tiny_batches = [{"input_ids": torch.randint(1, 256, (4, 32), generator=gen)} for _ in range(3)]
        tiny_found = rs.find_super_experts(tiny, tiny_batches, progress=False)
        flagged = [(int(r.layer), int(r.expert)) for r in tiny_found[tiny_found["is_super"]].itertuples()]
        print("flagged:", flagged, "planted:", PLANTED)
        assert PLANTED in flagged
        tiny_found.head(5)
        """
    ),
    code(
        """
        t = tiny_found.attrs["thresholds"]
        plots.super_expert_scatter(tiny_found, t["percentile_threshold"], t["max_threshold"])
        """
    ),
    md(
        """
        ## 3. The pruning check

        The paper's test of a Super Expert: prune it (zero its down-projection) and watch the
        model's outputs change far more than when pruning an ordinary expert of the same layer.
        `rs.prune_experts(model, [(layer, expert)])` is a context manager: the experts are
        pruned inside the block and restored exactly on exit. We measure the mean KL divergence
        of the next-token distribution from the unpruned model's, on the same inputs.
        """
    ),
    code(
        """
        def next_token_logprobs(model, batches):
            with torch.no_grad():
                return [torch.log_softmax(model(**b).logits.float(), -1) for b in batches]

        def prune_effect(model, experts, batches):
            \"\"\"Mean KL(unpruned || pruned) per token when `experts` are pruned.\"\"\"
            reference = next_token_logprobs(model, batches)
            with rs.prune_experts(model, experts):
                pruned = next_token_logprobs(model, batches)
            kl = [torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
                  for p, q in zip(reference, pruned)]
            return float(torch.cat([k.flatten() for k in kl]).mean())

        ordinary = (PLANTED[0], (PLANTED[1] + 1) % config.num_experts)
        effect = pd.DataFrame(
            [
                {"pruned": f"Super Expert L{PLANTED[0]}/e{PLANTED[1]}",
                 "mean_kl": prune_effect(tiny, [PLANTED], tiny_batches)},
                {"pruned": f"ordinary L{ordinary[0]}/e{ordinary[1]}",
                 "mean_kl": prune_effect(tiny, [ordinary], tiny_batches)},
            ]
        )
        effect
        """
    ),
    code(
        """
        import plotly.express as px

        fig = px.bar(effect, x="pruned", y="mean_kl", log_y=True, template=plots.TEMPLATE,
                     title="Output change after pruning one expert (mean KL per token, log scale)")
        fig.update_traces(marker_color=[plots.STATE_COLORS["super"], plots.STATE_COLORS["normal"]])
        fig
        """
    ),
    md(
        """
        The same check on the bundled model: prune the expert with the largest output (flagged
        or not) and, for comparison, the expert with the median output of the same layer.
        """
    ),
    code(
        """
        routed = found[~found["shared"]]
        top = routed.iloc[0]
        same_layer = routed[routed["layer"] == top["layer"]].sort_values("max_abs_output")
        median = same_layer.iloc[len(same_layer) // 2]
        pd.DataFrame(
            [
                {"pruned": f"{name} L{int(e.layer)}/e{int(e.expert)}", "is_super": bool(e.is_super),
                 "max_abs_output": e.max_abs_output,
                 "mean_kl": prune_effect(model, [(int(e.layer), int(e.expert))], batches)}
                for name, e in (("largest output", top), ("median output", median))
            ]
        )
        """
    ),
    md(
        """
        Run this check on every expert the detector flags before trusting it: a flagged expert
        whose pruning changes nothing is a false positive of the thresholds.
        `find_super_experts` takes the percentile (`quantile`), the `ratio` and the `layers`
        searched as parameters.
        """
    ),
]


COMPARE: list[Cell] = [
    md(
        """
        # Comparing two runs

        A routing change shows up as load moving between experts, a shift in balance, or a
        router that becomes more or less decisive (*saturated*). Here run A is the bundled
        model and run B a perturbed copy whose router weights are sharpened (×2) and
        perturbed with noise — a stand-in for a fine-tune, a quantization, or a new checkpoint.
        Both runs see the same texts. A second comparison contrasts two datasets on one model.
        """
    ),
    SETUP,
    RECORD_BY_DOMAIN,
    md(
        """
        ## 1. The perturbed copy

        In Qwen3-MoE the router is the `gate` of each sparse MLP block: a linear map from the
        hidden state to one logit per expert. Scaling its weights by 2 halves the softmax
        temperature (more saturated routing); the noise reshuffles which expert wins.
        """
    ),
    code(
        """
        import copy

        perturbed = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in perturbed.model.layers:
                w = layer.mlp.gate.weight
                w.mul_(2.0).add_(0.5 * w.std() * torch.randn(w.shape, generator=gen))

        run_a = record_by_domain(model, WORK / "original", per_domain=6, router_stats=True)
        run_b = record_by_domain(perturbed, WORK / "perturbed", per_domain=6, router_stats=True)
        run_a.manifest["tokens"], run_b.manifest["tokens"]
        """
    ),
    md(
        """
        `rs.compare(a, b)` returns a `Comparison` of B against A: `load` (per layer and expert,
        shares in A and B and their difference), `balance` (every balance metric in A, B and
        the delta), `expert_changes` (experts that died, revived, became hot or cooled) and
        `saturation` (below). It renders as a summary in the notebook.
        """
    ),
    code(
        """
        diff = rs.compare(run_a, run_b)
        diff
        """
    ),
    code(
        """
        diff.expert_changes
        """
    ),
    code(
        """
        plots.load_delta_heatmap(diff.load)
        """
    ),
    code(
        """
        plots.balance_change_figure(diff.balance)
        """
    ),
    md(
        """
        ## 2. Router saturation

        *Router saturation* (OLMoE's term) asks how many routing decisions survive the change:
        over the tokens present in both runs (same sequence, position and token id), the mean
        fraction of a token's top-k experts that are the same in A and B. 1.0 means the
        perturbation changed no decision; k/E is what two unrelated routers share by chance. `top1_agreement` is the same for the first choice alone.
        """
    ),
    code(
        """
        print(diff.notes or "no notes")
        plots.saturation_figure(diff.saturation)
        """
    ),
    md(
        """
        Saturation says whether decisions changed; the router's *confidence* is another matter.
        Sharpening the router makes it more decisive: the mean combine weight of slot 0 rises
        (for top-2 with renormalized weights it lies between 0.5 and 1), and with
        `router_stats=True` the `router_tokens` table shows the normalized entropy of the full
        router distribution falling (0 = all mass on one expert) and the top-1 − top-2
        probability margin growing.
        """
    ),
    code(
        """
        TOP1 = "SELECT layer, avg(weight) AS top1_weight FROM routing WHERE slot = 0 GROUP BY layer ORDER BY layer"
        decisiveness = run_a.sql(TOP1).merge(run_b.sql(TOP1), on="layer", suffixes=("_a", "_b"))
        decisiveness
        """
    ),
    code(
        """
        import plotly.express as px

        ROUTER = "SELECT layer, avg(entropy) AS entropy, avg(margin) AS margin FROM router_tokens GROUP BY layer"
        router = pd.concat([run_a.sql(ROUTER).assign(run="A: original"), run_b.sql(ROUTER).assign(run="B: perturbed")])
        router = router.merge(pd.concat([run_a.sql(TOP1).assign(run="A: original"),
                                         run_b.sql(TOP1).assign(run="B: perturbed")]), on=["layer", "run"])
        tidy = router.melt(id_vars=["layer", "run"], value_vars=["top1_weight", "entropy", "margin"], var_name="measure")
        fig = px.bar(tidy.sort_values("layer").assign(layer=lambda d: "L" + d["layer"].astype(str)), x="layer", y="value",
                     color="run", barmode="group", facet_col="measure", template=plots.TEMPLATE,
                     color_discrete_sequence=list(plots.RUN_COLORS), title="Router decisiveness per layer")
        fig.update_yaxes(matches=None, showticklabels=True)
        fig
        """
    ),
    md(
        """
        ## 3. Two datasets, one model

        The same tools compare data instead of models: A is the bundled model on code, B on
        multilingual text. Both slices come from one run through `where=` on the `domain`
        label (two separate runs would work the same way). Here the change in load is the
        model's own specialization.
        """
    ),
    code(
        """
        def side_by_side(a, b, keys):
            \"\"\"Two metric frames as one, columns suffixed _a and _b.\"\"\"
            return a.merge(b, on=keys, how="outer", suffixes=("_a", "_b"))

        code_only, multi_only = "domain = 'code'", "domain = 'multilingual'"
        plots.load_delta_heatmap(side_by_side(run_a.expert_load(where=code_only),
                                              run_a.expert_load(where=multi_only), ["layer", "expert"]))
        """
    ),
    code(
        """
        plots.balance_change_figure(side_by_side(run_a.balance(where=code_only),
                                                 run_a.balance(where=multi_only), ["layer"]))
        """
    ),
]


NOTEBOOKS: dict[str, list[Cell]] = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_load_balance.ipynb": LOAD_BALANCE,
    "03_entanglement_and_specialization.ipynb": ENTANGLEMENT,
    "04_super_experts.ipynb": SUPER_EXPERTS,
    "05_compare_runs.ipynb": COMPARE,
}


def build_notebook(cells: list[Cell]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(cells):
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        cell = make(source)
        cell["id"] = f"cell-{i:02d}"  # stable ids keep the diffs of regenerated notebooks small
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write the notebooks into")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build_notebook(cells), args.out / name)
        print(f"wrote {args.out / name} ({len(cells)} cells)")


if __name__ == "__main__":
    main()
