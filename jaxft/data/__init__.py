"""Data: sources (files, bundled sets, hub), tasks (tokenised fixed-shape arrays), the batch iterator."""
