-- Imported runs whose slot order is unknown (a Megatron trace without logits: slot 0 is the
-- lowest expert id, not the first choice). Such tokens carry the label slot_order = 'unknown'.

-- name: unknown_slot_order_tokens
-- How many selected tokens have no known first choice.
SELECT count(*) AS tokens FROM selected_tokens WHERE slot_order = 'unknown'
