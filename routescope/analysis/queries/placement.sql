-- Expert-parallel placement (docs/placement.md): loads per forward step, for plans built on one
-- window of steps and evaluated on the next, and for the per-step load files serving engines read.

-- name: routing_step_loads
-- `step_loads` from routing: routing rows per (step, layer, expert) among the selected tokens.
SELECT t.step, r.layer, r.expert, count(*)::BIGINT AS tokens
FROM selected_routing r
JOIN selected_tokens t USING (seq_id, pos)
GROUP BY t.step, r.layer, r.expert

-- name: step_expert_load
-- Routing rows per (step, layer, expert) among the selected tokens (experts with no rows are absent), from `step_loads` (routing_ or rollup_).
SELECT step, layer, expert, tokens
FROM step_loads
ORDER BY step, layer, expert
