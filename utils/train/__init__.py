"""The training engine: the loop, its callbacks and plug-in events, config and hyperparameters, optimizer and
schedule, EMA, freezing, precision, AutoBatch, AutoAnchor, --evolve, the YOLOv5 loss."""
