"""Running a model on images: input sources, test-time augmentation, feature-map dumps, inference backends."""
