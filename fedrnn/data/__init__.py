"""Step 1 of a run: reviews in (loaders: IMDB, Amazon; files: a user's own labelled files),
tokens out (tokenizer), the target pool (target), clients' shards (partitions).
"""
