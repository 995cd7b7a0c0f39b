-- Load and balance (SPEC 4.1, 4.2). `expert_counts` is the one pass over routing that
-- expert_load, balance, dead_experts and hot_experts share.

-- name: routing_layer_expert_counts
-- `layer_expert_counts` from routing: routing rows per (layer, expert) among the selected tokens (`expert_counts` reads them).
SELECT layer, expert, count(*) AS n
FROM selected_routing
GROUP BY layer, expert

-- name: expert_counts
-- Per MoE layer and expert 0..E-1: routing rows L_e (`tokens`), share L_e / N, and tokens seen T = N / k.
WITH grid AS (
    SELECT layer, num_experts, top_k, unnest(range(num_experts))::SMALLINT AS expert
    FROM layer_info
),
loads AS (
    SELECT g.layer, g.expert, g.num_experts, g.top_k, coalesce(c.n, 0)::BIGINT AS tokens
    FROM grid g
    LEFT JOIN layer_expert_counts c ON c.layer = g.layer AND c.expert = g.expert
)
SELECT
    *,
    tokens / nullif(sum(tokens) OVER (PARTITION BY layer), 0) AS share,
    (sum(tokens) OVER (PARTITION BY layer) // top_k)::BIGINT AS tokens_seen
FROM loads

-- name: expert_load
-- layer, expert, tokens (L_e, every slot counts), share (L_e / N); experts with no rows show 0.
SELECT layer, expert, tokens, share
FROM expert_counts
ORDER BY layer, expert

-- name: balance
-- Per MoE layer: cv, max_violation, balancedness and norm_entropy of the expert loads.
WITH stats AS (
    SELECT
        layer,
        any_value(num_experts) AS num_experts,
        any_value(top_k) AS top_k,
        sum(tokens)::BIGINT AS routing_slots,
        max(tokens) AS max_load,
        sum(tokens) / any_value(num_experts) AS mean_load,
        any_value(tokens_seen) AS tokens
    FROM expert_counts
    GROUP BY layer
),
terms AS (
    SELECT
        c.layer,
        sum((c.tokens - s.mean_load) ^ 2) AS squared_deviation,
        sum(CASE WHEN c.tokens > 0 THEN c.share * ln(c.share) ELSE 0 END) AS plogp
    FROM expert_counts c
    JOIN stats s USING (layer)
    GROUP BY c.layer
)
SELECT
    s.layer,
    s.num_experts,
    s.top_k,
    s.tokens,
    s.routing_slots,
    sqrt(t.squared_deviation / s.num_experts) / nullif(s.mean_load, 0) AS cv,
    (s.max_load - s.mean_load) / nullif(s.mean_load, 0) AS max_violation,
    s.mean_load / nullif(s.max_load, 0) AS balancedness,
    CASE WHEN s.routing_slots > 0 AND s.num_experts > 1 THEN (0.0 - t.plogp) / ln(s.num_experts) END
        AS norm_entropy
FROM stats s
JOIN terms t USING (layer)
ORDER BY s.layer

-- name: dead_experts
-- Experts with share <= $max_share among T > 0 tokens, with the evidence: T and (1 - k/E)^T.
SELECT
    layer,
    expert,
    tokens,
    share,
    tokens_seen,
    pow(1.0 - top_k / num_experts, tokens_seen) AS p_uniform_miss
FROM expert_counts
WHERE tokens_seen > 0 AND share <= $max_share
ORDER BY layer, expert

-- name: hot_experts
-- Experts with share >= $factor / E, and ratio = share · E.
SELECT layer, expert, tokens, share, share * num_experts AS ratio
FROM expert_counts
WHERE tokens_seen > 0 AND share >= $factor / num_experts
ORDER BY layer, expert

-- name: step_coverage
-- Forward steps of which `where=` selects some tokens but not all (router_stats cannot be split within a step).
SELECT count(*) AS partial_steps
FROM (
    SELECT t.rank, t.step, count(*) AS total, count(s.seq_id) AS selected
    FROM tokens t
    LEFT JOIN selected_tokens s ON s.seq_id = t.seq_id AND s.pos = t.pos
    GROUP BY t.rank, t.step
)
WHERE selected > 0 AND selected < total

-- name: aux_loss
-- Per MoE layer from router_stats over the selected steps: aux_loss = E · Σ_e (L_e / T) · P̄_e.
WITH steps AS (
    SELECT DISTINCT rank, step FROM selected_tokens
),
stats AS (
    SELECT r.layer, r.expert, sum(r.prob_sum) AS prob_sum, sum(r.tokens) AS slots
    FROM router_stats r
    SEMI JOIN steps s ON s.rank = r.rank AND s.step = r.step
    GROUP BY r.layer, r.expert
),
totals AS (
    SELECT s.layer, sum(s.slots) / any_value(l.top_k) AS tokens
    FROM stats s
    JOIN layer_info l USING (layer)
    GROUP BY s.layer
)
SELECT
    l.layer,
    l.num_experts * sum((s.slots / nullif(t.tokens, 0)) * (s.prob_sum / nullif(t.tokens, 0))) AS aux_loss
FROM stats s
JOIN totals t USING (layer)
JOIN layer_info l USING (layer)
GROUP BY l.layer, l.num_experts
ORDER BY l.layer

-- name: imported_expert_counts
-- Counts-only runs: the imported `expert_counts` summed over the selected steps and ranks; `expert_counts` reads them as `layer_expert_counts`.
SELECT c.layer, c.expert, sum(c.tokens) AS n
FROM expert_counts c
SEMI JOIN selected_steps s USING (step)
GROUP BY c.layer, c.expert

-- name: aux_loss_step_mean
-- Per MoE layer: the mean over the selected forward steps of each step's E · Σ_e (L_e / T) · P̄_e (a training loop's per-batch value).
WITH steps AS (
    SELECT DISTINCT rank, step FROM selected_tokens
),
stats AS (
    SELECT r.rank, r.step, r.layer, r.expert, r.prob_sum, r.tokens AS slots
    FROM router_stats r
    SEMI JOIN steps s ON s.rank = r.rank AND s.step = r.step
),
totals AS (
    SELECT s.rank, s.step, s.layer, sum(s.slots) / any_value(l.top_k) AS tokens
    FROM stats s
    JOIN layer_info l USING (layer)
    GROUP BY s.rank, s.step, s.layer
),
per_step AS (
    SELECT
        s.rank,
        s.step,
        s.layer,
        any_value(l.num_experts) * sum((s.slots / nullif(t.tokens, 0)) * (s.prob_sum / nullif(t.tokens, 0))) AS loss
    FROM stats s
    JOIN totals t USING (rank, step, layer)
    JOIN layer_info l USING (layer)
    GROUP BY s.rank, s.step, s.layer
)
SELECT layer, avg(loss) AS aux_loss_step_mean, count(*)::BIGINT AS aux_loss_steps
FROM per_step
GROUP BY layer
ORDER BY layer

-- name: step_imported_expert_counts
-- Counts-only runs: routing rows per (step, layer, expert) over the selected steps, summed over ranks.
SELECT c.step, c.layer, c.expert, sum(c.tokens)::BIGINT AS tokens
FROM expert_counts c
SEMI JOIN selected_steps s USING (step)
WHERE c.layer IN (SELECT layer FROM layer_info)
GROUP BY c.step, c.layer, c.expert
ORDER BY c.step, c.layer, c.expert
