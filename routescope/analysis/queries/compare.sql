-- Two runs in one connection: run A through its views, run B through read_parquet of its parts.
-- Tokens are matched by content (SPEC 4.7): `content_pairs` (a_seq_id, a_pos, b_seq_id, b_pos)
-- is registered by compare.py from `content_keys` over each run's own tokens.

-- name: content_tokens
-- Every token of the run with `selected` = whether `where=` keeps it (content keys need whole sequences).
SELECT t.seq_id, t.pos, t.token_id, s.seq_id IS NOT NULL AS selected
FROM tokens t
LEFT JOIN selected_tokens s ON s.seq_id = t.seq_id AND s.pos = t.pos
ORDER BY t.seq_id, t.pos

-- name: router_saturation
-- Per MoE layer over the content-matched token pairs: tokens_matched, mean |topk_A ∩ topk_B| / k, slot-0 agreement.
WITH pairs AS (
    SELECT row_number() OVER () AS pair, a_seq_id, a_pos, b_seq_id, b_pos FROM content_pairs
),
a_rows AS (
    SELECT p.pair, r.layer, r.slot, r.expert
    FROM selected_routing r
    JOIN pairs p ON p.a_seq_id = r.seq_id AND p.a_pos = r.pos
),
b_rows AS (
    SELECT p.pair, r.layer, r.slot, r.expert
    FROM read_parquet($b_routing, hive_partitioning = true, union_by_name = true) r
    JOIN pairs p ON p.b_seq_id = r.seq_id AND p.b_pos = r.pos
),
overlap AS (
    SELECT
        a.layer,
        count(*) AS shared,
        count(*) FILTER (WHERE a.slot = 0 AND b.slot = 0) AS same_top1
    FROM a_rows a
    JOIN b_rows b ON b.pair = a.pair AND b.layer = a.layer AND b.expert = a.expert
    GROUP BY a.layer
),
n AS (
    SELECT count(*) AS tokens FROM pairs
)
SELECT
    l.layer,
    l.top_k,
    n.tokens AS tokens_matched,
    coalesce(o.shared, 0) / nullif(n.tokens * l.top_k, 0) AS saturation,
    coalesce(o.same_top1, 0) / nullif(n.tokens, 0) AS top1_agreement
FROM layer_info l
CROSS JOIN n
LEFT JOIN overlap o USING (layer)
ORDER BY l.layer
