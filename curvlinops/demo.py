"""The demo's old import path: the same module as :mod:`curvlinops.jobs.demo`."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("curvlinops.jobs.demo")
