"""Integrations with other RLHF frameworks, each an optional extra with its own pinned versions; nothing here is
imported by ``import dense_rlhf``."""
