"""TPAD stages 1-2, the downstream recommender's training, the shared loop and checkpointing."""
