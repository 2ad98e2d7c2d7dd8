"""Step 2: the LSTM classifier (rnn), its training loop (training), IMDB pretraining (pretrain),
checkpoints on disk (checkpoint).
"""
