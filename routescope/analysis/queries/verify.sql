-- SPEC 3.2 invariants of a run, for `routescope check` / Run.verify() (analysis/verify.py).
-- Each block returns the offending keys (empty when the invariant holds), except the
-- per-rank counts. Views: `check_tokens` and `check_routing` over every readable part, with
-- `rank` from the path and `stack` ('decoder' where a part lacks it); `check_layers`
-- (layer, num_experts, top_k, stack: NULL unless the manifest has stacks) from the manifest.

-- name: verify_duplicate_token_keys
-- (seq_id, pos) keys that appear in more than one tokens row, with their number of copies.
SELECT seq_id, pos, count(*) AS copies
FROM check_tokens
GROUP BY seq_id, pos
HAVING count(*) > 1

-- name: verify_duplicate_routing_keys
-- (seq_id, pos, layer, slot) keys that appear in more than one routing row.
SELECT seq_id, pos, layer, slot, count(*) AS copies
FROM check_routing
GROUP BY seq_id, pos, layer, slot
HAVING count(*) > 1

-- name: verify_routing_rows_per_token
-- (token, MoE layer of its stack) pairs without exactly k routing rows: `rows` found, `top_k` expected.
WITH per_token AS (
    SELECT seq_id, pos, layer, count(*) AS n
    FROM check_routing
    GROUP BY seq_id, pos, layer
),
keys AS (
    SELECT DISTINCT seq_id, pos, stack FROM check_tokens
)
SELECT t.seq_id, t.pos, l.layer, l.top_k, coalesce(p.n, 0)::BIGINT AS rows
FROM keys t
JOIN check_layers l ON l.stack IS NULL OR l.stack = t.stack
LEFT JOIN per_token p ON p.seq_id = t.seq_id AND p.pos = t.pos AND p.layer = l.layer
WHERE coalesce(p.n, 0) <> l.top_k

-- name: verify_routing_without_token
-- (seq_id, pos) keys of routing rows that have no tokens row, with the number of such routing rows.
SELECT seq_id, pos, count(*) AS copies
FROM check_routing
ANTI JOIN check_tokens USING (seq_id, pos)
GROUP BY seq_id, pos

-- name: verify_routing_out_of_range
-- Routing rows whose layer is not a recorded MoE layer, or whose slot or expert is out of range.
SELECT r.layer, r.slot, r.expert, count(*) AS copies
FROM check_routing r
LEFT JOIN (SELECT DISTINCT layer, num_experts, top_k FROM check_layers) l ON l.layer = r.layer
WHERE l.layer IS NULL
    OR r.slot < 0 OR r.slot >= l.top_k
    OR r.expert < 0 OR r.expert >= l.num_experts
GROUP BY r.layer, r.slot, r.expert

-- name: verify_tokens_per_rank
-- Per rank: token rows, and the highest seq_id (a later append must start above it).
SELECT rank, count(*)::BIGINT AS tokens, max(seq_id) AS max_seq_id
FROM check_tokens
GROUP BY rank
ORDER BY rank
