"""d2merge's version: a leaf module, so that the writers that record it import nothing above them.

``from d2merge import __version__`` reads the package face, whose lazy names point up at
``d2merge.api``; a model card or a file header below ``api`` takes the version from here.
"""

__version__ = "0.1.0"
