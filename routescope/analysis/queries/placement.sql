-- Expert-parallel placement (docs/placement.md): loads per forward step, for plans built on one
-- window of steps and evaluated on the next, and for the per-step load files serving engines read.

-- name: step_expert_load
-- Routing rows per (step, layer, expert) among the selected tokens (experts with no rows are absent).
SELECT t.step, r.layer, r.expert, count(*)::BIGINT AS tokens
FROM selected_routing r
JOIN selected_tokens t USING (seq_id, pos)
GROUP BY t.step, r.layer, r.expert
ORDER BY t.step, r.layer, r.expert
