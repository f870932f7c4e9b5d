"""Scoring: detection validation with v7.0 semantics, mAP and the confusion matrix, the pycocotools cross-check."""
