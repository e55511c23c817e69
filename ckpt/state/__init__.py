"""Live objects <-> state tree: adapters, capture, the tree encoding, DataLoader position."""
