"""Zoo blocks (transformer); each block is one registered class."""
