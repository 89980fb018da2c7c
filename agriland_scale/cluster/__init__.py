"""Clustering of patch embeddings: streaming k-means and DEC fits, and the cluster report."""
