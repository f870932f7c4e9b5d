"""Zoo blocks (attention); each block is one registered class."""
