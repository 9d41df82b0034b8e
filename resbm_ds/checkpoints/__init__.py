"""Checkpoints: the store (store.py: tags, `latest`, manifests, saving's last steps, pruning, which
tag a path names) and reading their weights safely (loading.py)."""
