-- Routing replay (capture/control/replay.py): a run's decisions laid out per token, so a model can be made to follow them.

-- name: replay_tokens
-- Every token of the run (seq_id, pos, token_id) in (seq_id, pos) order; the row number is the token index.
SELECT seq_id, pos, token_id FROM tokens ORDER BY seq_id, pos

-- name: replay_context_tokens
-- Token ids without routing (imported prompt positions the server never returned): they complete the content keys.
SELECT seq_id, pos, token_id FROM context_tokens

-- name: replay_experts
-- Every routing row as (token index in replay_tokens' order, layer, slot, expert); one pass over all layers.
WITH t AS (
    SELECT seq_id, pos, row_number() OVER (ORDER BY seq_id, pos) - 1 AS token FROM tokens
)
SELECT t.token, r.layer, r.slot, r.expert
FROM routing r
JOIN t USING (seq_id, pos)

-- name: replay_weights
-- Every routing row's recorded combine weight as (token index in replay_tokens' order, layer, slot, weight).
WITH t AS (
    SELECT seq_id, pos, row_number() OVER (ORDER BY seq_id, pos) - 1 AS token FROM tokens
)
SELECT t.token, r.layer, r.slot, r.weight
FROM routing r
JOIN t USING (seq_id, pos)
