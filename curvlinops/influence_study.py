"""The influence job's old import path: the same module as :mod:`curvlinops.jobs.influence`."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("curvlinops.jobs.influence")
