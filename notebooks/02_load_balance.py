# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Load balance: over layers, phases and steps
#
# An MoE layer is only as fast as its busiest expert, and an expert that is never chosen
# is dead weight. This notebook records the bundled model twice — a forward pass over
# held-out text, and `generate` on short prompts — and looks at the load per layer, per
# phase (prefill vs decode) and per forward step.

# %%
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import torch
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
from transformers import AutoModelForCausalLM, AutoTokenizer

import routescope as rs
from routescope import plots

torch.manual_seed(0)
torch.set_num_threads(2)
pd.set_option("display.precision", 4)

MODEL_DIR, CORPUS = rs.bundled.model_path(), rs.bundled.corpus_path()  # data/ beside the package
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

# %% [markdown]
# ## What the metrics mean
#
# For one MoE layer with E experts and top-k routing, L_e is the number of routing slots
# that went to expert e (every one of the k slots of a token counts), N = Σ L_e, the
# share s_e = L_e / N and the mean load m = N / E.
#
# | metric | formula | even load | read it as |
# |---|---|---|---|
# | `cv` | std(L) / m | 0 | spread of the loads relative to the mean |
# | `max_violation` | (max L − m) / m | 0 | how overloaded the busiest expert is (MaxVio) |
# | `balancedness` | m / max L | 1 | the fraction of peak throughput an expert-parallel layer reaches |
# | `norm_entropy` | −Σ s ln s / ln E | 1 | 1 = all experts used equally, 0 = one expert takes all |
# | `aux_loss` | E · Σ (L_e / T) · P̄_e | k (1 for top-1) | the Switch / Mixtral load-balancing loss; needs `router_stats=True` |
#
# `aux_loss` also uses the router's probabilities P̄_e, so it is recorded only with
# `router_stats=True`.

# %% [markdown]
# ## 1. Prefill: a forward pass over held-out text, with router statistics

# %%
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

# %%
plots.balance_figure(balance)

# %%
plots.load_heatmap(run.expert_load(), value="share")

# %% [markdown]
# ## 2. Phases: prefill vs decode with `generate`
#
# During `generate` the first forward reads the whole prompt (phase `prefill`), then
# each following forward adds one token per sequence (phase `decode`). Decode tokens are
# the model's own predictions, so their routing can differ from the prompt's.
# Generation needs left padding so every prompt ends at the same position.

# %%
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


# %% [markdown]
# Compare the two phases with the same figures used to compare two runs: prefill is run
# A (dashed), decode is run B (solid). The figure builders take the two sides in one
# frame, with `_a` and `_b` columns (the shape `rs.compare(a, b)` returns). Decode has
# far fewer tokens, so part of any difference is sampling noise; the heatmap shows which
# experts gain or lose load.

# %%
def side_by_side(a, b, keys):
    """Two metric frames as one, columns suffixed _a and _b."""
    return a.merge(b, on=keys, how="outer", suffixes=("_a", "_b"))

phases = side_by_side(gen.balance(where="phase = 'prefill'"), gen.balance(where="phase = 'decode'"), ["layer"])
phases[["layer", "tokens_a", "tokens_b", "cv_a", "cv_b", "norm_entropy_a", "norm_entropy_b"]]

# %%
plots.balance_change_figure(phases)

# %%
load_phases = side_by_side(gen.expert_load(where="phase = 'prefill'"),
                           gen.expert_load(where="phase = 'decode'"), ["layer", "expert"])
plots.load_delta_heatmap(load_phases)

# %% [markdown]
# ## 3. Steps: load per forward pass
#
# Each forward pass is a `step`. The balance of a single step tells whether the load is
# steady over time or jumps around. With T tokens each choosing k of E experts, even a
# perfectly uniform router shows cv ≈ √((E − k) / (k · T)) from sampling noise alone, so
# small decode steps always look unbalanced: compare each step with that line.

# %%
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

# %%
import plotly.express as px

mean_over_layers = per_step.groupby(["step", "phase"], as_index=False)[["cv", "uniform_cv"]].mean()
fig = px.line(mean_over_layers.melt(id_vars=["step", "phase"], var_name="series", value_name="value"),
              x="step", y="value", color="series", markers=True, template=plots.TEMPLATE,
              title="cv per forward step (mean over MoE layers) vs the uniform-router noise level")
fig.update_yaxes(title="cv", rangemode="tozero")
fig

# %% [markdown]
# A step whose cv sits close to the uniform line is as balanced as its few tokens allow;
# a step far above it concentrates its tokens on a few experts. In serving, this is the
# per-batch imbalance that expert-parallel systems (EPLB) try to smooth by replicating
# the hot experts.

# %% [markdown]
# The runs of this notebook were written to a temporary folder (`WORK`); the last cell
# removes it. Skip it to keep them, e.g. to open them with `routescope dashboard`.

# %%
shutil.rmtree(WORK, ignore_errors=True)
