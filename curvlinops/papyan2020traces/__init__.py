"""Spectral densities of Papyan (2020), under curvlinops-for-pytorch 3.0.1's names.

- Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
  spectra. Journal of Machine Learning Research (JMLR),
  https://jmlr.org/papers/v21/20-933.html

See :mod:`curvlinops.papyan2020traces.spectrum`; :mod:`curvlinops.spectral` has
this library's own interface to the same quadrature.
"""
