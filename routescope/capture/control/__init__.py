"""Model control: replaying recorded routing, banning experts, forcing a router's choice, pruning."""
