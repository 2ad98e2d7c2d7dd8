"""Step 1 of a run: reviews in (loaders), tokens out (tokenizer), the target pool (target),
clients' shards (partitions).
"""
