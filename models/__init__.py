"""YOLOv5-compatible models built from YAML through the module registry.

Importing the package (or any module in it) registers every block the project ships, so a YAML may name any
of them whatever else was imported first. Each block module imports only the registry and the blocks it
builds on, and none imports the builder (:mod:`models.yolo`), so the order below is free of import cycles.
"""

import models.attention
import models.backbones
import models.classify
import models.common
import models.heads
import models.transformer  # noqa: F401
