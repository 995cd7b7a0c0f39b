-- Two runs in one connection: run A through its views, run B through read_parquet of its parts.

-- name: router_saturation
-- Per MoE layer, tokens in both runs with equal (seq_id, pos, token_id): mean |topk_A ∩ topk_B| / k and slot-0 agreement.
WITH b_tokens AS (
    SELECT seq_id, pos, token_id
    FROM read_parquet($b_tokens, hive_partitioning = true, union_by_name = true)
),
matched AS (
    SELECT a.seq_id, a.pos
    FROM selected_tokens a
    JOIN b_tokens b ON b.seq_id = a.seq_id AND b.pos = a.pos AND b.token_id = a.token_id
),
a_rows AS (
    SELECT seq_id, pos, layer, slot, expert FROM selected_routing SEMI JOIN matched USING (seq_id, pos)
),
b_rows AS (
    SELECT seq_id, pos, layer, slot, expert
    FROM read_parquet($b_routing, hive_partitioning = true, union_by_name = true)
    SEMI JOIN matched USING (seq_id, pos)
),
overlap AS (
    SELECT
        a.layer,
        count(*) AS shared,
        count(*) FILTER (WHERE a.slot = 0 AND b.slot = 0) AS same_top1
    FROM a_rows a
    JOIN b_rows b ON b.seq_id = a.seq_id AND b.pos = a.pos AND b.layer = a.layer AND b.expert = a.expert
    GROUP BY a.layer
),
n AS (
    SELECT count(*) AS tokens FROM matched
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
