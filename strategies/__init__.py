"""Server side: Flower strategy wrappers and the fedprune ServerApp."""
