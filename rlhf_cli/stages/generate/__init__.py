"""`rlhf generate`: sample K responses per prompt from a policy, score them with a judge, and
write one JSON row per prompt (settings.py, policy.py, run.py, shards.py)."""
