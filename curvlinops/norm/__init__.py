"""curvlinops-for-pytorch 3.0.1's ``curvlinops.norm`` (see :mod:`curvlinops.norm.hutchinson`)."""
