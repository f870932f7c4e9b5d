"""Channel pruning: sparse training (Network Slimming), the pruning core and the pruning scripts' library."""
