"""Zoo blocks (backbones); each block is one registered class."""
