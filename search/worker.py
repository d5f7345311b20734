"""What the workers of a search's local Ray import when Ray starts them, before any trial is theirs.

A search that starts its own Ray on a machine without a CUDA device names this module in
`RAY_preload_python_modules` (`fika.search.ray_session.local_ray_environment`): the workers Ray starts with itself, one
per CPU, import the trial's libraries (torch, transformers, peft, trl, Ray Tune and the trainable) while the driver
reads the data, and Tune's trainable actors take those workers (`fika.search.internals.actors_in_prestarted_workers`).
`FIKA_HIDE_LIBRARIES` names the optional libraries no trial of the search needs
(`fika.search.trainable.unused_libraries`).
"""

import os

from fika.model import hide_libraries
from fika.trial import import_trial_libraries

hide_libraries([name for name in os.environ.get("FIKA_HIDE_LIBRARIES", "").split(",") if name])
import_trial_libraries()
import fika.search.trainable  # noqa: E402, F401  (Ray Tune and the trainable class)
