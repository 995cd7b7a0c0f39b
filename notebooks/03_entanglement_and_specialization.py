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
# # Entanglement and specialization
#
# Two questions about *where* tokens go:
#
# * **Entanglement** — does the expert a token uses in one layer predict the expert it
#   uses in the next? If routing were independent across layers, the mutual information
#   (MI) between consecutive top-1 experts would be close to the shuffled baseline.
# * **Specialization** — do experts prefer some domains or some tokens? `lift` = share
#   within a domain × E: 1.0 is a fair share, 4.0 is four times the fair share.

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


# %%
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


# %%
run = record_by_domain(model, WORK / "by_domain", per_domain=12)
run

# %% [markdown]
# ## 1. Mutual information across layers
#
# Blue bars: MI (bits) between each token's top-1 expert in a layer and in the next MoE
# layer. Grey bars: the same after shuffling the second layer's experts across tokens —
# what the plug-in estimate gives from finite data alone. Only the gap above grey is
# structure. `top1_predictability` is the accuracy of guessing the next expert from the
# current one by the most common transition.

# %%
ent = run.entanglement()
ent

# %%
plots.entanglement_figure(ent)

# %% [markdown]
# The transition matrix of the most entangled pair of layers: row a, column b is the
# probability that a token whose top-1 expert is a moves to b. Rows with one bright cell
# are near-deterministic hand-offs.

# %%
top = ent.sort_values("mutual_info_bits", ascending=False).iloc[0]
a, b = int(top["layer"]), int(top["next_layer"])
trans = run.transition(a, b)
plots.transition_heatmap(trans, a, b, run.num_experts(a), run.num_experts(b))

# %% [markdown]
# Within a layer, `coactivation(layer)` counts pairs of experts chosen for the same token
# (P(b | a)): experts that are nearly always chosen together behave like one wide expert.

# %%
plots.coactivation_heatmap(run.coactivation(a), run.num_experts(a), layer=a)

# %% [markdown]
# ## 2. Pathways
#
# A pathway is the sequence of top-1 experts one token takes through all MoE layers.
# The Sankey draws the most frequent ones; a few thick bands mean tokens follow a few
# fixed routes.

# %%
paths = run.pathways(top=20)
paths.head(10)

# %%
plots.pathway_sankey(paths, run.moe_layers)

# %% [markdown]
# ## 3. Per-domain lift
#
# `run.specialization(by="domain")` gives, for every domain, layer and expert, the share
# of that domain's routing slots the expert receives and its lift. Red cells are experts
# a domain prefers.

# %%
spec = run.specialization(by="domain")
spec.sort_values("lift", ascending=False).head(10)

# %%
spread = spec.groupby("layer")["lift"].std().idxmax()  # the layer whose lifts differ most
plots.specialization_heatmap(spec, "domain", layer=int(spread))

# %% [markdown]
# ## 4. Vocabulary specialization and repetition
#
# Some experts serve particular tokens (punctuation, digits, indentation) rather than a
# domain. `vocab_specialization()` gives, per layer and token id, the expert that token
# goes to most often (`top_expert`), the fraction of its occurrences that go there
# (`top_share`) and the lift over the uniform k/E. The table lists the most
# concentrated frequent tokens of the last MoE layer. `repetition_rate()` is the fraction of consecutive tokens in a
# sequence whose top-1 expert is the same. A uniform router gives 1/E (the grey marks);
# `marginal_baseline` (Σ p_e², p_e the top-1 shares) is what this layer's own uneven
# load gives by chance. Mixtral's authors found rates well above chance: consecutive
# tokens often share experts.

# %%
vocab = run.vocab_specialization(min_occurrences=20)  # tokens seen at least 20 times
vocab = vocab.assign(token=[repr(tokenizer.decode([int(t)])) for t in vocab["token_id"]])
last = run.moe_layers[-1]
vocab[vocab["layer"] == last].sort_values(["top_share", "occurrences"], ascending=False).head(12)

# %%
rep = run.repetition_rate()
plots.repetition_figure(rep)

# %% [markdown]
# The runs of this notebook were written to a temporary folder (`WORK`); the last cell
# removes it. Skip it to keep them, e.g. to open them with `routescope dashboard`.

# %%
shutil.rmtree(WORK, ignore_errors=True)
