-- After `open_run(..., skip_corrupt=True)` skipped a part, the views keep only what every
-- table agrees on (analysis/database.py): the tokens that still have routing rows (and,
-- where the run has them, router_stats of their step and router_tokens rows), and the rows
-- of the other tables that belong to those tokens and steps. Each block reads the
-- unfiltered views `raw_<table>`; the token filters read the tokens kept so far as `kept_tokens`.

-- name: tokens_with_routing
-- Tokens that still have routing rows (a skipped routing part takes its tokens with it).
SELECT * FROM kept_tokens SEMI JOIN (SELECT DISTINCT seq_id, pos FROM raw_routing) USING (seq_id, pos)

-- name: tokens_with_router_stats
-- Tokens whose forward step still has router_stats rows.
SELECT * FROM kept_tokens SEMI JOIN (SELECT DISTINCT step, rank FROM raw_router_stats) USING (step, rank)

-- name: tokens_with_router_tokens
-- Tokens that still have router_tokens rows.
SELECT * FROM kept_tokens SEMI JOIN (SELECT DISTINCT seq_id, pos FROM raw_router_tokens) USING (seq_id, pos)

-- name: consistent_routing
-- Routing rows whose token is still in `tokens` (a skipped tokens part takes its routing with it).
SELECT * FROM raw_routing SEMI JOIN tokens USING (seq_id, pos)

-- name: consistent_router_tokens
-- Per-token router statistics of the tokens still in `tokens`.
SELECT * FROM raw_router_tokens SEMI JOIN tokens USING (seq_id, pos)

-- name: consistent_router_stats
-- Per-step router statistics of the steps still in `tokens`.
SELECT * FROM raw_router_stats SEMI JOIN (SELECT DISTINCT step, rank FROM tokens) USING (step, rank)
