-- Co-activation within a layer (SPEC 4.3) and top-1 routing across layers (SPEC 4.4).

-- name: routing_coactivation_chosen
-- The selected routing rows of layer $layer (read by routing_coactivation_pairs and routing_coactivation_loads).
SELECT seq_id, pos, slot, expert FROM selected_routing WHERE layer = $layer

-- name: routing_coactivation_pairs
-- `coactivation_pairs` from routing: tokens per ordered pair (a, b) of distinct experts both chosen in layer $layer.
SELECT a.expert AS expert_a, b.expert AS expert_b, count(*) AS n
FROM coactivation_chosen a
JOIN coactivation_chosen b ON b.seq_id = a.seq_id AND b.pos = a.pos AND b.slot <> a.slot
GROUP BY a.expert, b.expert

-- name: routing_coactivation_loads
-- `coactivation_loads` from routing: routing rows L_a per expert of layer $layer.
SELECT expert, count(*) AS n FROM coactivation_chosen GROUP BY expert

-- name: coactivation
-- Ordered pairs of distinct experts chosen for the same token in layer $layer: count(a, b) and P(b | a) = count / L_a, from `coactivation_pairs` and `coactivation_loads` (routing_ or rollup_).
WITH experts AS (
    SELECT unnest(range(num_experts))::SMALLINT AS expert FROM layer_info WHERE layer = $layer
)
SELECT
    a.expert AS expert_a,
    b.expert AS expert_b,
    coalesce(p.n, 0)::BIGINT AS count,
    coalesce(p.n, 0) / nullif(l.n, 0) AS p_b_given_a
FROM experts a
JOIN experts b ON b.expert <> a.expert
LEFT JOIN coactivation_pairs p ON p.expert_a = a.expert AND p.expert_b = b.expert
LEFT JOIN coactivation_loads l ON l.expert = a.expert
ORDER BY expert_a, expert_b

-- name: top1_paths
-- Per selected token with a slot-0 row in every MoE layer: seq_id, pos and its slot-0 experts in MoE-layer order.
SELECT seq_id, pos, path
FROM (
    -- sorting packed (layer, expert) values is cheaper than an ordered list aggregate
    SELECT
        seq_id,
        pos,
        list_transform(list_sort(list(layer::INTEGER * 65536 + expert)), lambda x: (x % 65536)::SMALLINT) AS path
    FROM selected_routing
    WHERE slot = 0 AND layer IN (SELECT layer FROM layer_info)
    GROUP BY seq_id, pos
)
WHERE len(path) = (SELECT count(*) FROM layer_info)

-- name: routing_top1_pairs
-- `top1_pairs` from routing: tokens with complete slot-0 paths per (expert A at a MoE layer, expert B at the next).
WITH t1_ordered AS (
    SELECT layer, lead(layer) OVER (ORDER BY layer) AS next_layer, row_number() OVER (ORDER BY layer) AS idx
    FROM layer_info
),
t1_steps AS (
    SELECT
        unnest(range(1, len(path))) AS idx,
        unnest(path[1:len(path) - 1]) AS expert_a,
        unnest(path[2:len(path)]) AS expert_b
    FROM top1_paths
),
t1_pairs AS (
    SELECT idx, expert_a, expert_b, count(*) AS count FROM t1_steps GROUP BY idx, expert_a, expert_b
)
SELECT o.layer, o.next_layer, p.expert_a, p.expert_b, p.count
FROM t1_pairs p
JOIN t1_ordered o USING (idx)

-- name: top1_pair_counts
-- Tokens per (slot-0 expert A at a MoE layer, slot-0 expert B at the next MoE layer), all consecutive pairs, from `top1_pairs` (routing_ or rollup_).
SELECT layer, next_layer, expert_a, expert_b, count
FROM top1_pairs
ORDER BY layer, expert_a, expert_b

-- name: pair_information
-- Per layer pair of `pair_counts` (sample 0 observed, 1 permuted): plug-in MI, H(A), H(B), H(B|A), top-1 predictability.
-- With S = Σ c·log2(c) over cells or margins, H(X) = log2(n) − S_X / n and MI = H(A) + H(B) − H(A, B).
WITH counts AS (
    SELECT sample, layer, next_layer, expert_a, expert_b, count::DOUBLE AS n
    FROM pair_counts
    WHERE count > 0
),
joint AS (
    SELECT sample, layer, next_layer, sum(n) AS n, sum(n * log2(n)) AS s FROM counts GROUP BY ALL
),
margin_a AS (
    SELECT sample, layer, next_layer, sum(n) AS n, max(n) AS best FROM counts GROUP BY sample, layer, next_layer, expert_a
),
margin_b AS (
    SELECT sample, layer, next_layer, sum(n) AS n FROM counts GROUP BY sample, layer, next_layer, expert_b
),
sums_a AS (
    SELECT sample, layer, next_layer, sum(n * log2(n)) AS s, sum(best) AS best FROM margin_a GROUP BY ALL
),
sums_b AS (
    SELECT sample, layer, next_layer, sum(n * log2(n)) AS s FROM margin_b GROUP BY ALL
),
info AS (
    SELECT
        j.sample,
        j.layer,
        j.next_layer,
        j.n::BIGINT AS tokens,
        greatest(log2(j.n) - a.s / j.n, 0.0) AS entropy_a_bits,
        greatest(log2(j.n) - b.s / j.n, 0.0) AS entropy_b_bits,
        greatest(log2(j.n) - (a.s + b.s - j.s) / j.n, 0.0) AS mutual_info_bits,
        a.best / j.n AS top1_predictability
    FROM joint j
    JOIN sums_a a USING (sample, layer, next_layer)
    JOIN sums_b b USING (sample, layer, next_layer)
)
SELECT
    o.layer,
    o.next_layer,
    o.tokens,
    least(o.mutual_info_bits, o.entropy_a_bits, o.entropy_b_bits) AS mutual_info_bits,
    CASE WHEN o.entropy_b_bits > 0 THEN least(o.mutual_info_bits / o.entropy_b_bits, 1.0) ELSE 0.0 END
        AS norm_mutual_info,
    greatest(o.entropy_b_bits - o.mutual_info_bits, 0.0) AS cond_entropy_bits,
    o.top1_predictability,
    least(p.mutual_info_bits, p.entropy_a_bits, p.entropy_b_bits) AS baseline_mutual_info_bits,
    o.entropy_a_bits,
    o.entropy_b_bits
FROM info o
LEFT JOIN info p ON p.sample = 1 AND p.layer = o.layer AND p.next_layer = o.next_layer
WHERE o.sample = 0
ORDER BY o.layer, o.next_layer

-- name: routing_transition_counts
-- `transition_counts` from routing: selected tokens per (slot-0 expert a at $layer, slot-0 expert b at $next_layer); pairs with none are absent.
WITH trans_a AS (
    SELECT seq_id, pos, expert FROM selected_routing WHERE layer = $layer AND slot = 0
),
trans_b AS (
    SELECT seq_id, pos, expert FROM selected_routing WHERE layer = $next_layer AND slot = 0
)
SELECT a.expert AS expert_a, b.expert AS expert_b, count(*) AS n
FROM trans_a a JOIN trans_b b ON b.seq_id = a.seq_id AND b.pos = a.pos
GROUP BY a.expert, b.expert

-- name: transition
-- Every (slot-0 expert a at $layer, slot-0 expert b at $next_layer) with its token count and P(b | a), from `transition_counts` (routing_ or rollup_).
WITH experts_a AS (
    SELECT unnest(range(num_experts))::SMALLINT AS expert FROM layer_info WHERE layer = $layer
),
experts_b AS (
    SELECT unnest(range(num_experts))::SMALLINT AS expert FROM layer_info WHERE layer = $next_layer
),
grid AS (
    SELECT ea.expert AS expert_a, eb.expert AS expert_b, coalesce(c.n, 0)::BIGINT AS count
    FROM experts_a ea
    CROSS JOIN experts_b eb
    LEFT JOIN transition_counts c ON c.expert_a = ea.expert AND c.expert_b = eb.expert
)
SELECT expert_a, expert_b, count, count / nullif(sum(count) OVER (PARTITION BY expert_a), 0) AS p_b_given_a
FROM grid
ORDER BY expert_a, expert_b

-- name: pathways
-- The $top most frequent paths of slot-0 experts through all MoE layers, with token counts and shares.
SELECT path, count(*) AS count, count(*) / sum(count(*)) OVER () AS share
FROM top1_paths
GROUP BY path
ORDER BY count DESC, path
LIMIT $top
