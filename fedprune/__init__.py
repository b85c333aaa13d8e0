"""Pure numerics of fedprune: codec, masks, pruning, privacy, data, models (no Flower)."""
