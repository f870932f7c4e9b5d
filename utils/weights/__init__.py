"""Model weights in and out: safe checkpoint loading (YOLOv5 pickles, our format), atomic saves, torchvision ImageNet
weights for zoo backbones."""
