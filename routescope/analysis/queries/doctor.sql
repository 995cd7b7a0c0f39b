-- The doctor (SPEC 4.8): the passes `analysis/doctor.py` runs, then the queries a finding hands
-- the user in its `sql` column (`show_*`: plain SQL over the run's views, run with run.sql).

-- name: doctor_capacity_drops
-- Per MoE layer: routing slots of the selected tokens (`expert_counts`: the rollups when they answer) and those recorded with weight 0 (a slot the expert capacity dropped). The filter `weight = 0` lets DuckDB skip every Parquet row group whose minimum weight is above 0.
WITH dropped AS (
    SELECT layer, count(*)::BIGINT AS dropped FROM selected_routing WHERE weight = 0 GROUP BY layer
),
slots AS (
    SELECT layer, sum(tokens)::BIGINT AS slots FROM expert_counts GROUP BY layer
)
SELECT s.layer, s.slots, coalesce(d.dropped, 0)::BIGINT AS dropped
FROM slots s
LEFT JOIN dropped d USING (layer)
WHERE s.slots > 0
ORDER BY s.layer

-- name: doctor_near_ties
-- Per MoE layer from router_tokens: tokens, those whose top-1 minus top-2 probability is below $margin, and the median margin.
SELECT
    r.layer,
    count(*)::BIGINT AS tokens,
    count(*) FILTER (WHERE r.margin < $margin)::BIGINT AS near_ties,
    median(r.margin) AS median_margin
FROM router_tokens r
SEMI JOIN selected_tokens s USING (seq_id, pos)
GROUP BY r.layer
ORDER BY r.layer

-- name: show_expert_load
-- The routing slots of every expert of layer $layer, most loaded first.
SELECT expert, count(*) AS slots, count(*) / sum(count(*)) OVER () AS share
FROM routing WHERE layer = $layer GROUP BY expert ORDER BY slots DESC

-- name: show_expert_over_steps
-- Per forward step: tokens of the step and slots routed to expert $expert of layer $layer.
SELECT t.step, count(DISTINCT (t.seq_id, t.pos)) AS tokens, count(*) FILTER (WHERE r.expert = $expert) AS slots
FROM tokens t JOIN routing r USING (seq_id, pos)
WHERE r.layer = $layer GROUP BY t.step ORDER BY t.step

-- name: show_layer_over_steps
-- Per forward step: the busiest expert's slots of layer $layer over the mean (max_violation + 1).
SELECT step, max(n) / avg(n) AS max_over_mean, count(*) AS experts_used
FROM (
    SELECT t.step, r.expert, count(*) AS n
    FROM tokens t JOIN routing r USING (seq_id, pos)
    WHERE r.layer = $layer GROUP BY t.step, r.expert
)
GROUP BY step ORDER BY step

-- name: show_near_ties
-- Tokens of layer $layer whose top-1 and top-2 router probabilities differ by less than $margin, closest first.
SELECT seq_id, pos, margin, entropy FROM router_tokens
WHERE layer = $layer AND margin < $margin ORDER BY margin LIMIT 100

-- name: show_dropped_slots
-- Routing slots of layer $layer recorded with weight 0 (dropped by the expert capacity).
SELECT seq_id, pos, slot, expert FROM routing
WHERE layer = $layer AND weight = 0 ORDER BY seq_id, pos, slot LIMIT 100

-- name: show_super_experts
-- The calibration's largest expert outputs (Super Experts stand far above the rest).
SELECT layer, expert, shared, max_abs_output, channel FROM expert_activations
ORDER BY max_abs_output DESC LIMIT 20

-- name: doctor_sequences_over_steps
-- Sequences whose tokens lie in more than one forward step (decode); none lets the step loads join routing by seq_id alone.
SELECT count(*)::BIGINT AS sequences
FROM (SELECT seq_id FROM tokens GROUP BY seq_id HAVING min(step) <> max(step))

-- name: doctor_step_loads_by_sequence
-- Routing rows per (step, layer, expert) when every sequence lies in one step: routing joined to its sequence's step (a join on seq_id, not on (seq_id, pos)).
WITH sequence_step AS (
    SELECT seq_id, min(step) AS step FROM tokens GROUP BY seq_id
)
SELECT s.step, r.layer, r.expert, count(*)::BIGINT AS tokens
FROM routing r
JOIN sequence_step s USING (seq_id)
GROUP BY s.step, r.layer, r.expert
ORDER BY s.step, r.layer, r.expert
