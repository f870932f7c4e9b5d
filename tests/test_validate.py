"""validate_detector's validation losses (v7.0's val/box_loss, val/obj_loss, val/cls_loss in results.csv)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.yolo import DetectionModel
from utils.data import create_dataloader, load_data_config
from utils.evaluation.detection import ValidationOptions, validate_detector
from utils.train.config import load_hyp
from utils.train.loss import ComputeLoss, scale_loss_gains


def _setup(data_yaml, batch_size: int, cache_dir):
    """A seeded, untrained yolov5n (nc=6) in eval mode, the sample's rect val loader at 128 px, names, its loss."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=6).eval()
    data = load_data_config(data_yaml)
    loader, _ = create_dataloader(data["val"], 128, batch_size, 32, rect=True, pad=0.5, cache_dir=cache_dir)
    return model, loader, data["names"], ComputeLoss(model, scale_loss_gains(load_hyp(), 6, 3, 128))


def test_validation_loss_is_the_mean_training_loss_of_the_val_batches(sample_data_yaml, tmp_path):
    model, loader, names, loss = _setup(sample_data_yaml, 5, tmp_path)

    expected, batches = torch.zeros(3), 0
    with torch.no_grad():  # independently: the raw maps of each batch in NCHW, targets normalised
        for images, targets, *_ in loader:
            expected += loss(model(images.float() / 255)[1], targets)[1]
            batches += 1
    assert batches == 3  # 12 images in batches of 5: the mean is over batches, as in v7.0

    options = ValidationOptions(compute_loss=loss, names=names, streams=2)
    metrics = validate_detector(model, loader, 6, options)
    assert metrics["val_loss"] == pytest.approx((expected / batches).tolist(), rel=1e-4)
    assert min(metrics["val_loss"]) > 0


def test_exported_backends_report_no_validation_loss(sample_data_yaml, tmp_path):
    model, loader, names, loss = _setup(sample_data_yaml, 6, tmp_path)

    def backend(images: torch.Tensor) -> torch.Tensor:  # what an exported model returns: decoded boxes only
        with torch.no_grad():
            return model(images)[0]

    metrics = validate_detector(backend, loader, 6, ValidationOptions(compute_loss=loss, names=names))
    assert "val_loss" not in metrics and metrics["n_images"] == 12


def test_augment_validates_the_three_tta_passes_and_needs_a_pytorch_model(sample_data_yaml, tmp_path):
    model, loader, names, _ = _setup(sample_data_yaml, 12, tmp_path)
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda _module, args: seen.append(tuple(args[0].shape)))

    plain = validate_detector(model, loader, 6, ValidationOptions(names=names, streams=1))
    assert seen == [(12, 3, 160, 160)]  # one pass over the rect batch (128 px padded by half a stride)
    seen.clear()
    augmented = validate_detector(model, loader, 6, ValidationOptions(augment=True, names=names, streams=1))
    # utils.inference.tta's scales 1, 0.83, 0.67 of 160 px, each padded up to the stride
    assert seen == [(12, 3, 160, 160), (12, 3, 160, 160), (12, 3, 128, 128)]
    assert augmented["n_images"] == plain["n_images"] == 12

    with pytest.raises(ValueError, match="--augment needs PyTorch weights"):
        validate_detector(lambda images: model(images)[0], loader, 6, ValidationOptions(augment=True))


def test_prediction_grid_draws_only_confident_boxes(tmp_path):
    """val_batch*_pred.jpg shows boxes above conf 0.25 (v7.0), each on its own tile of the grid."""
    import cv2

    from utils.common.plots import plot_batch_predictions

    images = np.full((2, 3, 64, 64), 128, np.uint8)
    faint = np.array([[4, 4, 30, 30, 0.2, 0]], np.float32)
    sure = np.array([[10, 10, 50, 50, 0.9, 1]], np.float32)
    grid = cv2.imread(str(plot_batch_predictions(images, [faint, sure], ["a", "b"], tmp_path / "pred.jpg")))
    assert grid.shape == (64, 128, 3)  # two tiles side by side
    changed = np.abs(grid.astype(int) - 128).max(-1) > 40
    assert not changed[:, :64].any(), "a box at conf 0.2 was drawn"
    assert changed[:, 64 + 10].any() and changed[:, 64 + 50].any()  # left and right edges of the 0.9 box


def test_validation_leaves_the_batches_it_scores_unchanged(sample_data_yaml, tmp_path):
    """EagleEye scores hundreds of candidates on the same in-memory batches: labels scaled to pixels in place
    would leave every candidate after the first scored against wrong boxes."""
    model, loader, names, _ = _setup(sample_data_yaml, 6, tmp_path)
    batches = list(loader)
    before = [batch[1].clone() for batch in batches]
    validate_detector(model, batches, 6, ValidationOptions(names=names, streams=1))
    for targets, kept in zip([batch[1] for batch in batches], before):
        assert torch.equal(targets, kept)
