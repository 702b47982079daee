"""The trainer (torch): fits models on features from quietwire.agent's one extractor."""
