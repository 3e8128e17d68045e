"""Microbenchmarks of ``dense_rewards`` against every alternative a user has (``dense-rlhf bench``)."""
