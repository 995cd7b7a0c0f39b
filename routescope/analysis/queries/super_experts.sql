-- The Super Experts calibration table (SPEC 4.6); classification lives in
-- routescope.capture.calibration.activations.classify_super_experts, the one place of its thresholds.

-- name: expert_activations
-- Per (layer, expert, shared), over all calibration parts: max |down-proj output|, its channel, tokens seen.
SELECT
    layer,
    expert,
    shared,
    max(max_abs_output) AS max_abs_output,
    arg_max(channel, max_abs_output) AS channel,
    sum(tokens_seen)::BIGINT AS tokens_seen
FROM expert_activations
GROUP BY layer, expert, shared
ORDER BY layer, expert, shared

-- name: hidden_stats
-- Per decoder layer, over all calibration parts: largest |h| of the residual stream, its channel, sequence and position, the median |h| (median of the parts' medians).
SELECT
    layer,
    max(max_abs) AS max_abs,
    median(median_abs) AS median_abs,
    arg_max(channel, max_abs) AS channel,
    arg_max(seq_id, max_abs) AS seq_id,
    arg_max(pos, max_abs) AS pos
FROM hidden_stats
GROUP BY layer
ORDER BY layer
