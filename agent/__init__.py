"""The agent: packets to flows to features (and, later, scores, rules and alerts). No torch."""
