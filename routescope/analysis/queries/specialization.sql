-- Specialization (SPEC 4.5): by label value, by token id (OLMoE), and the Mixtral repetition rate.

-- name: routing_specialization_counts
-- `specialization_counts` from routing: rows per (value of label $label, layer, expert) of the selected tokens; a value with no routing rows stands once with NULL layer and expert.
WITH spec_labelled AS (
    SELECT seq_id, pos, label_value
    FROM (SELECT seq_id, pos, COLUMNS(lambda c: c = $label) AS label_value FROM selected_tokens)
    WHERE label_value IS NOT NULL
),
spec_values AS (
    SELECT label_value, (row_number() OVER (ORDER BY label_value) - 1)::BIGINT AS label_id
    FROM (SELECT DISTINCT label_value FROM spec_labelled)
),
spec_token_labels AS (
    SELECT t.seq_id, t.pos, v.label_id
    FROM spec_labelled t
    JOIN spec_values v USING (label_value)
),
spec_packed AS (
    -- One pass over routing joined to a small token -> label-id map; the GROUP BY key packs
    -- (label id, layer, expert) into one BIGINT, which also stops DuckDB from pushing a partial
    -- aggregate per (seq_id, pos, layer, expert) below the join (that costs ~10x at 100M rows).
    SELECT (t.label_id << 32) | (r.layer::BIGINT << 16) | r.expert::BIGINT AS k, count(*) AS n
    FROM routing r
    JOIN spec_token_labels t USING (seq_id, pos)
    GROUP BY k
)
SELECT v.label_value, ((p.k >> 16) & 65535)::SMALLINT AS layer, (p.k & 65535)::SMALLINT AS expert, p.n
FROM spec_values v
LEFT JOIN spec_packed p ON p.k >> 32 = v.label_id

-- name: specialization
-- Per value of the label $label, layer and expert: L_e(D), share = L_e(D) / N(D) and lift = share · E, from `specialization_counts` (routing_ or rollup_specialization_counts).
WITH label_values AS (
    SELECT DISTINCT label_value FROM specialization_counts
),
grid AS (
    SELECT v.label_value, l.layer, l.num_experts, unnest(range(l.num_experts))::SMALLINT AS expert
    FROM label_values v
    CROSS JOIN layer_info l
),
loads AS (
    SELECT g.label_value, g.layer, g.expert, g.num_experts, coalesce(c.n, 0)::BIGINT AS tokens
    FROM grid g
    LEFT JOIN specialization_counts c
        ON c.label_value = g.label_value AND c.layer = g.layer AND c.expert = g.expert
),
shares AS (
    SELECT *, tokens / nullif(sum(tokens) OVER (PARTITION BY label_value, layer), 0) AS share FROM loads
)
SELECT label_value, layer, expert, tokens, share, share * num_experts AS lift
FROM shares
ORDER BY label_value, layer, expert

-- name: vocab_counts_token
-- Routing rows per (layer, token id, expert) of the selected tokens, and where (seq_id, pos, slot) the expert first appears for that id.
SELECT r.layer, t.token_id, r.expert, count(*) AS n, min((r.seq_id, r.pos, r.slot)) AS first_seen
FROM selected_routing r
JOIN selected_tokens t USING (seq_id, pos)
GROUP BY ALL

-- name: vocab_counts_next_token
-- As vocab_counts_token, keyed by the ground-truth next token (the id at pos + 1 of the same sequence; the last token has none).
SELECT r.layer, n.token_id, r.expert, count(*) AS n, min((r.seq_id, r.pos, r.slot)) AS first_seen
FROM selected_routing r
JOIN selected_tokens t USING (seq_id, pos)
JOIN tokens n ON n.seq_id = t.seq_id AND n.pos = t.pos + 1
GROUP BY ALL

-- name: vocab_specialization
-- Per layer and token id with >= $min_occurrences (from `vocab_counts`): top expert (ties: first seen, as OLMoE), its share, how many tie, k/E.
WITH per_token AS (
    SELECT
        c.layer,
        c.token_id,
        sum(c.n) // any_value(l.top_k) AS occurrences,
        -- OLMoE sorts a Counter by count (a stable sort): among equal counts the expert it met first wins
        first(c.expert ORDER BY c.n DESC, c.first_seen) AS top_expert,
        max(c.n) AS top_count,
        any_value(l.top_k) / any_value(l.num_experts) AS baseline
    FROM vocab_counts c
    JOIN layer_info l USING (layer)
    GROUP BY c.layer, c.token_id
),
ties AS (
    SELECT c.layer, c.token_id, count(*) AS ties
    FROM vocab_counts c
    JOIN per_token p ON p.layer = c.layer AND p.token_id = c.token_id AND c.n = p.top_count
    GROUP BY c.layer, c.token_id
)
SELECT
    p.layer,
    p.token_id,
    p.occurrences::BIGINT AS occurrences,
    p.top_expert,
    p.top_count / p.occurrences AS top_share,
    t.ties::BIGINT AS ties,
    p.baseline,
    p.top_count / p.occurrences / p.baseline AS lift
FROM per_token p
JOIN ties t ON t.layer = p.layer AND t.token_id = p.token_id
WHERE p.occurrences >= $min_occurrences
ORDER BY p.layer, p.token_id

-- name: routing_repetition_pairs
-- `repetition_pairs` from routing: per MoE layer, consecutive selected tokens with complete slot-0 paths (pairs, repeats of the slot-0 expert) and with slot-0/1 rows (pairs_top2, repeats_top2: top-2 sets that meet).
WITH rep_ordered AS (
    SELECT layer, row_number() OVER (ORDER BY layer) AS idx FROM layer_info
),
rep_neighbours AS (
    SELECT unnest(range(1, len(a.path) + 1)) AS idx, unnest(a.path) AS expert_a, unnest(b.path) AS expert_b
    FROM top1_paths a
    JOIN top1_paths b ON b.seq_id = a.seq_id AND b.pos = a.pos + 1
),
rep_pairs AS (
    SELECT idx, count(*) AS pairs, count(*) FILTER (WHERE expert_a = expert_b) AS repeats
    FROM rep_neighbours
    GROUP BY idx
),
-- "first or second choice" (Mixtral Table 5): the tokens' slot 0 and 1 experts, per layer
rep_top2_rows AS (
    SELECT seq_id, pos, layer, expert
    FROM selected_routing
    WHERE slot < 2 AND layer IN (SELECT layer FROM layer_info WHERE top_k >= 2)
),
rep_top2_tokens AS (
    SELECT DISTINCT seq_id, pos, layer FROM rep_top2_rows
),
rep_top2_pairs AS (
    SELECT a.layer, count(*) AS pairs
    FROM rep_top2_tokens a
    JOIN rep_top2_tokens b ON b.seq_id = a.seq_id AND b.pos = a.pos + 1 AND b.layer = a.layer
    GROUP BY a.layer
),
rep_top2_repeats AS (
    SELECT layer, count(*) AS repeats
    FROM (
        SELECT DISTINCT a.layer, a.seq_id, a.pos
        FROM rep_top2_rows a
        JOIN rep_top2_rows b ON b.seq_id = a.seq_id AND b.pos = a.pos + 1 AND b.layer = a.layer AND b.expert = a.expert
    )
    GROUP BY layer
)
SELECT o.layer, p.pairs, p.repeats, p2.pairs AS pairs_top2, r2.repeats AS repeats_top2
FROM rep_ordered o
LEFT JOIN rep_pairs p USING (idx)
LEFT JOIN rep_top2_pairs p2 ON p2.layer = o.layer
LEFT JOIN rep_top2_repeats r2 ON r2.layer = o.layer

-- name: routing_repetition_firsts
-- `repetition_firsts` from routing: per MoE layer and expert, the selected tokens with complete slot-0 paths whose slot-0 expert it is.
WITH rep_first_ordered AS (
    SELECT layer, row_number() OVER (ORDER BY layer) AS idx FROM layer_info
),
rep_top1 AS (
    SELECT unnest(range(1, len(path) + 1)) AS idx, unnest(path) AS expert FROM top1_paths
)
SELECT o.layer, t.expert, count(*) AS n
FROM rep_top1 t
JOIN rep_first_ordered o USING (idx)
GROUP BY o.layer, t.expert

-- name: repetition_rate
-- Per MoE layer: consecutive token pairs sharing their slot-0 expert (rate, 1/E, Σ p_e²) and their top-2 sets sharing an expert (rate, 1 − C(E−2,2)/C(E,2)), from `repetition_pairs` and `repetition_firsts` (routing_ or rollup_).
WITH totals AS (
    -- a join, not a window: DuckDB 1.x/2.0 computed sum() OVER before a rank filter of the rollups
    SELECT layer, sum(n) AS total FROM repetition_firsts GROUP BY layer
),
shares AS (
    SELECT f.layer, f.n / t.total AS p FROM repetition_firsts f JOIN totals t USING (layer)
),
marginal AS (
    SELECT layer, sum(p * p) AS baseline FROM shares GROUP BY layer
)
SELECT
    o.layer,
    coalesce(p.pairs, 0)::BIGINT AS pairs,
    coalesce(p.repeats, 0)::BIGINT AS repeats,
    p.repeats / nullif(p.pairs, 0) AS repetition_rate,
    1.0 / o.num_experts AS baseline,
    m.baseline AS marginal_baseline,
    (CASE WHEN o.top_k >= 2 THEN coalesce(p.repeats_top2, 0) ELSE 0 END)::BIGINT AS repeats_top2,
    CASE WHEN o.top_k >= 2 THEN coalesce(p.repeats_top2, 0) / nullif(p.pairs_top2, 0) END AS repetition_rate_top2,
    CASE WHEN o.top_k >= 2 AND o.num_experts >= 2
        THEN 1.0 - ((o.num_experts - 2) * (o.num_experts - 3)) / (o.num_experts * (o.num_experts - 1.0))
    END AS baseline_top2
FROM layer_info o
LEFT JOIN repetition_pairs p USING (layer)
LEFT JOIN marginal m USING (layer)
ORDER BY o.layer
