"""compress: a staged model compression and export pipeline.

Importing the package stays light: heavy libraries (torch, onnxruntime, transformers) are imported by the
modules that need them.
"""

__version__ = "0.1.0"
