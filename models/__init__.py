"""Models built from YAML by one registry; importing this package registers every block."""

import models.classify
import models.yolo  # noqa: F401
