-- Two runs in one connection: run A through its views, run B through read_parquet of its parts.
-- Tokens are matched by content (SPEC 4.7): `content_pairs` (pair, a_seq_id, a_pos, b_seq_id, b_pos)
-- and `saturation_layers` (layer, rank) are registered by saturation.py; the overlap is NumPy there.

-- name: content_tokens
-- Every token of the run with `selected` = whether `where=` keeps it (content keys need whole sequences).
SELECT t.seq_id, t.pos, t.token_id, s.seq_id IS NOT NULL AS selected, true AS routed
FROM tokens t
LEFT JOIN selected_tokens s ON s.seq_id = t.seq_id AND s.pos = t.pos
ORDER BY t.seq_id, t.pos

-- name: content_tokens_with_context
-- content_tokens plus the run's context_tokens (ids without routing, imported prompts): they complete prefixes, never selected, not routed.
SELECT t.seq_id, t.pos, t.token_id, s.seq_id IS NOT NULL AS selected, true AS routed
FROM tokens t
LEFT JOIN selected_tokens s ON s.seq_id = t.seq_id AND s.pos = t.pos
UNION ALL
SELECT c.seq_id, c.pos, c.token_id, false AS selected, false AS routed
FROM context_tokens c
ORDER BY seq_id, pos

-- name: saturation_cells_a
-- Run A's routing rows of the matched tokens as (cell, expert): cell = pair · layers · slots + layer rank · slots + slot
-- (INTEGER or BIGINT, the type of `pair`).
SELECT p.pair * $cells_per_pair + l.rank * $slots + r.slot AS cell, r.expert
FROM routing r
JOIN content_pairs p ON p.a_seq_id = r.seq_id AND p.a_pos = r.pos
JOIN saturation_layers l ON l.layer = r.layer

-- name: saturation_cells_b
-- Run B's routing rows (its parts, read here) as (cell, expert) for every pair that matched them.
SELECT p.pair * $cells_per_pair + l.rank * $slots + r.slot AS cell, r.expert
FROM read_parquet($b_routing, hive_partitioning = true, union_by_name = true) r
JOIN content_pairs p ON p.b_seq_id = r.seq_id AND p.b_pos = r.pos
JOIN saturation_layers l ON l.layer = r.layer

-- name: routing_of_a
-- Run A's routing rows, in file order (a scan, so DuckDB keeps the order of the rows).
SELECT * FROM routing

-- name: routing_of_b
-- Run B's routing rows from its parts, in file order.
SELECT * FROM read_parquet($b_routing, hive_partitioning = true, union_by_name = true)

-- name: slot_experts
-- slot and expert of every routing row of `source_routing`, in file order.
SELECT slot, expert FROM source_routing

-- name: slot0_groups
-- One row per (token, layer) of `source_routing`, from its slot-0 row, in file order: token key and layer.
SELECT (seq_id << 24) | pos AS token, layer FROM source_routing WHERE slot = 0

