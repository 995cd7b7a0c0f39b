-- Building blocks that metrics.py puts in front of every metric query as CTEs.
-- `selected_tokens` (the tokens matching the user's `where=`) is composed in metrics.py.

-- name: layer_info
-- One row per MoE layer from the manifest: layer, num_experts (E) and top_k (k).
SELECT
    unnest($layers)::SMALLINT AS layer,
    unnest($num_experts)::INTEGER AS num_experts,
    unnest($top_k)::INTEGER AS top_k

-- name: all_tokens
-- Every recorded token (no `where=`).
SELECT * FROM tokens

-- name: all_routing
-- Every routing row (no `where=`): no join with tokens at all.
SELECT * FROM routing

-- name: filtered_routing
-- The routing rows of the selected tokens.
SELECT * FROM routing SEMI JOIN selected_tokens USING (seq_id, pos)
