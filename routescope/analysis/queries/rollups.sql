-- Rollup tables (SPEC 3.3 `rollup_*`, docs/run_format.md): building them (the `*_rows` blocks,
-- run by `routescope index --engine duckdb|spark` on DuckDB or, translated by dialect.to_spark, on
-- Spark; they equal the NumPy builder of store/rollups.py), and the metrics read from the rollup
-- rows a `where=` selects (`selected_rollup`, `selected_pairs`, `selected_repetition`, composed in
-- querying.py). Each metric equals its routing-based twin.
-- The builders read CTEs composed by analysis/rollup_build.py: `index_routing` (routing rows of
-- one rank with their part name `part`), `index_tokens` (seq_id, pos and the token dimensions),
-- `pair_tokens` (seq_id, pos and the dimensions without the step), and for repetition
-- `target_parts`, `b_tokens`, `a_tokens`.

-- name: rollup_expert_counts_rows
-- Per routing part: routing rows and slot-0 rows per (token dimensions, layer, expert); routing without its token counts under NULL dimensions.
SELECT
    r.part,
    t.* EXCLUDE (seq_id, pos),
    r.layer::SMALLINT AS layer,
    r.expert::SMALLINT AS expert,
    count(*)::BIGINT AS tokens,
    (count(*) FILTER (WHERE r.slot = 0))::BIGINT AS first
FROM index_routing r
LEFT JOIN index_tokens t ON t.seq_id = r.seq_id AND t.pos = r.pos
GROUP BY ALL

-- name: rollup_top1_pairs_rows
-- Per routing part: tokens whose slot-0 experts at consecutive MoE layers of the part were A then B, per dimensions without the step; tokens missing a layer of the part are left out.
WITH part_layers AS (
    SELECT
        part,
        layer,
        lead(layer) OVER (PARTITION BY part ORDER BY layer) AS next_layer,
        count(*) OVER (PARTITION BY part) AS n_layers
    FROM (SELECT DISTINCT part, layer FROM index_routing)
),
firsts AS (
    SELECT part, seq_id, pos, layer, min(expert) AS expert
    FROM index_routing
    WHERE slot = 0
    GROUP BY part, seq_id, pos, layer
),
complete AS (
    SELECT f.part, f.seq_id, f.pos
    FROM firsts f
    JOIN part_layers l ON l.part = f.part AND l.layer = f.layer
    GROUP BY f.part, f.seq_id, f.pos
    HAVING count(*) = max(l.n_layers)
)
SELECT
    c.part,
    t.* EXCLUDE (seq_id, pos),
    a.layer::SMALLINT AS layer,
    l.next_layer::SMALLINT AS next_layer,
    a.expert::SMALLINT AS expert_a,
    b.expert::SMALLINT AS expert_b,
    count(*)::BIGINT AS count
FROM complete c
JOIN pair_tokens t ON t.seq_id = c.seq_id AND t.pos = c.pos
JOIN firsts a ON a.part = c.part AND a.seq_id = c.seq_id AND a.pos = c.pos
JOIN part_layers l ON l.part = a.part AND l.layer = a.layer
JOIN firsts b ON b.part = c.part AND b.seq_id = c.seq_id AND b.pos = c.pos AND b.layer = l.next_layer
GROUP BY ALL

-- name: rollup_coactivation_rows
-- Per routing part: tokens that chose experts A <= B in two slots of one layer, per dimensions without the step (unordered pairs; SPEC 4.3 counts them both ways round).
SELECT
    x.part,
    t.* EXCLUDE (seq_id, pos),
    x.layer::SMALLINT AS layer,
    least(x.expert, y.expert)::SMALLINT AS expert_a,
    greatest(x.expert, y.expert)::SMALLINT AS expert_b,
    count(*)::BIGINT AS count
FROM index_routing x
JOIN index_routing y
    ON y.part = x.part AND y.seq_id = x.seq_id AND y.pos = x.pos AND y.layer = x.layer AND y.slot > x.slot
JOIN pair_tokens t ON t.seq_id = x.seq_id AND t.pos = x.pos
GROUP BY ALL

-- name: rollup_repetition_rows
-- Per routing part of the later token, both tokens' dimensions and layer: consecutive pairs, equal slot-0 experts, top-2 sets that meet.
WITH top2 AS (
    SELECT
        seq_id,
        pos,
        layer,
        any_value(part) AS part,
        min(expert) FILTER (WHERE slot = 0) AS e0,
        min(expert) FILTER (WHERE slot = 1) AS e1
    FROM index_routing
    WHERE slot < 2
    GROUP BY seq_id, pos, layer
),
pairs AS (
    SELECT
        b.part,
        b.seq_id,
        b.pos,
        b.layer,
        a.e0 = b.e0 AS repeat,
        coalesce(a.e0 = b.e0 OR a.e0 = b.e1 OR a.e1 = b.e0 OR a.e1 = b.e1, false) AS repeat_top2
    FROM top2 b
    JOIN top2 a ON a.seq_id = b.seq_id AND a.pos = b.pos - 1 AND a.layer = b.layer
    WHERE b.part IN (SELECT part FROM target_parts)
)
SELECT
    p.part,
    tb.* EXCLUDE (seq_id, pos),
    ta.* EXCLUDE (seq_id, pos),
    p.layer,
    count(*)::BIGINT AS pairs,
    (count(*) FILTER (WHERE p.repeat))::BIGINT AS repeats,
    (count(*) FILTER (WHERE p.repeat_top2))::BIGINT AS repeats_top2
FROM pairs p
JOIN b_tokens tb ON tb.seq_id = p.seq_id AND tb.pos = p.pos
JOIN a_tokens ta ON ta.seq_id = p.seq_id AND ta.pos = p.pos - 1
GROUP BY ALL
ORDER BY ALL

-- name: rollup_layer_expert_counts
-- Routing rows per (layer, expert) of the selected rollup rows: `expert_counts` reads them as `layer_expert_counts`.
SELECT layer, expert, sum(tokens) AS n
FROM selected_rollup
GROUP BY layer, expert

-- name: rollup_step_expert_load
-- Routing rows per (step, layer, expert) of the selected rollup rows (experts with no rows are absent).
SELECT step, layer, expert, sum(tokens)::BIGINT AS tokens
FROM selected_rollup
WHERE step IS NOT NULL
GROUP BY step, layer, expert
HAVING sum(tokens) > 0
ORDER BY step, layer, expert

-- name: rollup_specialization
-- As `specialization`, from the selected rollup rows: per value of label $label, layer and expert, L_e(D), share and lift.
WITH labelled AS (
    SELECT label_value, layer, expert, tokens
    FROM (SELECT COLUMNS(lambda c: c = $label) AS label_value, layer, expert, tokens FROM selected_rollup)
    WHERE label_value IS NOT NULL
),
label_values AS (
    SELECT DISTINCT label_value FROM labelled
),
counts AS (
    SELECT label_value, layer, expert, sum(tokens) AS n FROM labelled GROUP BY ALL
),
grid AS (
    SELECT v.label_value, l.layer, l.num_experts, unnest(range(l.num_experts))::SMALLINT AS expert
    FROM label_values v
    CROSS JOIN layer_info l
),
loads AS (
    SELECT g.label_value, g.layer, g.expert, g.num_experts, coalesce(c.n, 0)::BIGINT AS tokens
    FROM grid g
    LEFT JOIN counts c ON c.label_value = g.label_value AND c.layer = g.layer AND c.expert = g.expert
),
shares AS (
    SELECT *, tokens / nullif(sum(tokens) OVER (PARTITION BY label_value, layer), 0) AS share FROM loads
)
SELECT label_value, layer, expert, tokens, share, share * num_experts AS lift
FROM shares
ORDER BY label_value, layer, expert

-- name: rollup_top1_pair_counts
-- As `top1_pair_counts`, from the selected rollup rows: tokens per (slot-0 expert A at a MoE layer, B at the next).
WITH ordered AS (
    SELECT layer, lead(layer) OVER (ORDER BY layer) AS next_layer FROM layer_info
)
SELECT p.layer, p.next_layer, p.expert_a, p.expert_b, sum(p.count)::BIGINT AS count
FROM selected_pairs p
JOIN ordered o ON o.layer = p.layer AND o.next_layer = p.next_layer
GROUP BY ALL
ORDER BY p.layer, p.expert_a, p.expert_b

-- name: rollup_transition
-- As `transition` for consecutive MoE layers $layer, $next_layer, from the selected rollup rows.
WITH counts AS (
    SELECT expert_a, expert_b, sum(count) AS n
    FROM selected_pairs
    WHERE layer = $layer AND next_layer = $next_layer
    GROUP BY ALL
),
experts_a AS (
    SELECT unnest(range(num_experts))::SMALLINT AS expert FROM layer_info WHERE layer = $layer
),
experts_b AS (
    SELECT unnest(range(num_experts))::SMALLINT AS expert FROM layer_info WHERE layer = $next_layer
),
grid AS (
    SELECT ea.expert AS expert_a, eb.expert AS expert_b, coalesce(c.n, 0)::BIGINT AS count
    FROM experts_a ea
    CROSS JOIN experts_b eb
    LEFT JOIN counts c ON c.expert_a = ea.expert AND c.expert_b = eb.expert
)
SELECT expert_a, expert_b, count, count / nullif(sum(count) OVER (PARTITION BY expert_a), 0) AS p_b_given_a
FROM grid
ORDER BY expert_a, expert_b

-- name: rollup_repetition_rate
-- As `repetition_rate`, from the selected rollup rows: pairs and repeats per layer, slot-0 shares for Σ p_e².
WITH pairs AS (
    SELECT layer, sum(pairs) AS pairs, sum(repeats) AS repeats, sum(repeats_top2) AS repeats_top2
    FROM selected_repetition
    GROUP BY layer
),
firsts AS (
    SELECT layer, expert, sum(first) AS n FROM selected_rollup GROUP BY layer, expert HAVING sum(first) > 0
),
totals AS (
    -- a join, not a window: DuckDB 1.x/2.0 computed sum() OVER here before the rank filter
    SELECT layer, sum(n) AS total FROM firsts GROUP BY layer
),
shares AS (
    SELECT f.layer, f.n / t.total AS p FROM firsts f JOIN totals t USING (layer)
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
    CASE WHEN o.top_k >= 2 THEN coalesce(p.repeats_top2, 0) / nullif(p.pairs, 0) END AS repetition_rate_top2,
    CASE WHEN o.top_k >= 2 AND o.num_experts >= 2
        THEN 1.0 - ((o.num_experts - 2) * (o.num_experts - 3)) / (o.num_experts * (o.num_experts - 1.0))
    END AS baseline_top2
FROM layer_info o
LEFT JOIN pairs p USING (layer)
LEFT JOIN marginal m USING (layer)
ORDER BY o.layer

-- name: rollup_coactivation
-- As `coactivation` of layer $layer, from the selected rollup rows: unordered pair counts both ways round, P(b | a) = count / L_a.
WITH pairs AS (
    SELECT expert_a, expert_b, sum(count) AS n FROM selected_coactivation WHERE layer = $layer GROUP BY ALL
),
both_ways AS (
    SELECT expert_a, expert_b, n FROM pairs
    UNION ALL
    SELECT expert_b AS expert_a, expert_a AS expert_b, n FROM pairs
),
loads AS (
    SELECT expert, sum(tokens) AS n FROM selected_rollup WHERE layer = $layer GROUP BY expert
),
experts AS (
    SELECT unnest(range(num_experts))::SMALLINT AS expert FROM layer_info WHERE layer = $layer
)
SELECT
    a.expert AS expert_a,
    b.expert AS expert_b,
    coalesce(p.n, 0)::BIGINT AS count,
    coalesce(p.n, 0) / nullif(l.n, 0) AS p_b_given_a
FROM experts a
JOIN experts b ON b.expert <> a.expert
LEFT JOIN both_ways p ON p.expert_a = a.expert AND p.expert_b = b.expert
LEFT JOIN loads l ON l.expert = a.expert
ORDER BY expert_a, expert_b
