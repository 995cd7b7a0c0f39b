-- Rollup tables (SPEC 3.3 `rollup_*`, docs/run_format.md): building them (the `*_rows` blocks,
-- run by `routescope index --engine duckdb|spark` on DuckDB or, translated by dialect.to_spark, on
-- Spark; they equal the NumPy builder of store/rollups.py), and the counts a metric reads from the
-- rollup rows a `where=` selects (`selected_rollup`, `selected_pairs`, `selected_repetition`,
-- `selected_coactivation`). Each `rollup_<input>` block fills the input CTE `<input>` of one
-- metric query, in place of its `routing_<input>` twin next to that query; the metric's
-- arithmetic is that one query either way (querying.py `ROLLUP_INPUTS` composes them).
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
-- `layer_expert_counts` from the selected rollup rows: routing rows per (layer, expert) (`expert_counts` reads them).
SELECT layer, expert, sum(tokens) AS n
FROM selected_rollup
GROUP BY layer, expert

-- name: rollup_step_loads
-- `step_loads` from the selected rollup rows: routing rows per (step, layer, expert) (`step_expert_load` reads them).
SELECT step, layer, expert, sum(tokens)::BIGINT AS tokens
FROM selected_rollup
WHERE step IS NOT NULL
GROUP BY step, layer, expert
HAVING sum(tokens) > 0

-- name: rollup_specialization_counts
-- `specialization_counts` from the selected rollup rows: routing rows per (value of label $label, layer, expert).
SELECT label_value, layer, expert, sum(tokens) AS n
FROM (SELECT COLUMNS(lambda c: c = $label) AS label_value, layer, expert, tokens FROM selected_rollup)
WHERE label_value IS NOT NULL
GROUP BY ALL

-- name: rollup_top1_pairs
-- `top1_pairs` from the selected rollup rows: tokens per (slot-0 expert A at a MoE layer, B at the next MoE layer).
WITH t1_ordered AS (
    SELECT layer, lead(layer) OVER (ORDER BY layer) AS next_layer FROM layer_info
)
SELECT p.layer, p.next_layer, p.expert_a, p.expert_b, sum(p.count)::BIGINT AS count
FROM selected_pairs p
JOIN t1_ordered o ON o.layer = p.layer AND o.next_layer = p.next_layer
GROUP BY ALL

-- name: rollup_transition_counts
-- `transition_counts` from the selected rollup rows: tokens per (slot-0 expert a at $layer, b at $next_layer).
SELECT expert_a, expert_b, sum(count) AS n
FROM selected_pairs
WHERE layer = $layer AND next_layer = $next_layer
GROUP BY ALL

-- name: rollup_repetition_pairs
-- `repetition_pairs` from the selected rollup rows: consecutive pairs and repeats per layer (the rollups count top-2 pairs among the same pairs).
SELECT layer, sum(pairs) AS pairs, sum(repeats) AS repeats, sum(pairs) AS pairs_top2, sum(repeats_top2) AS repeats_top2
FROM selected_repetition
GROUP BY layer

-- name: rollup_repetition_firsts
-- `repetition_firsts` from the selected rollup rows: slot-0 rows per (layer, expert) with any.
SELECT layer, expert, sum(first) AS n FROM selected_rollup GROUP BY layer, expert HAVING sum(first) > 0

-- name: rollup_coactivation_pairs
-- `coactivation_pairs` from the selected rollup rows of layer $layer: the unordered pair counts both ways round.
WITH co_pairs AS (
    SELECT expert_a, expert_b, sum(count) AS n FROM selected_coactivation WHERE layer = $layer GROUP BY ALL
)
SELECT expert_a, expert_b, n FROM co_pairs
UNION ALL
SELECT expert_b AS expert_a, expert_a AS expert_b, n FROM co_pairs

-- name: rollup_coactivation_loads
-- `coactivation_loads` from the selected rollup rows: routing rows L_a per expert of layer $layer.
SELECT expert, sum(tokens) AS n FROM selected_rollup WHERE layer = $layer GROUP BY expert
