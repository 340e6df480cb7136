""" timm-reversible: memory-saving reversible Vision Transformers for timm.

Importing the package registers its models with timm:

    import timm, timm_reversible
    model = timm.create_model('revvit_small_cifar')
"""
from .models import *
from .models import ReversibleVisionTransformer, reconstruction_error
from .reversible import GridRangeError, NonFiniteActivationError, ReconstructionError
from ._hub import PretrainedWeightsNotFoundError

__version__ = '0.1.0'
