""" timm-reversible: memory-saving reversible Vision Transformers for timm.

Importing the package registers its models with timm:

    import timm, timm_reversible
    model = timm.create_model('revvit_small_cifar')

and `make_reversible` turns a timm ViT, pretrained or not, into a reversible one in place:

    model = timm_reversible.make_reversible(timm.create_model('vit_base_patch16_224', pretrained=True))
"""
from .models import *
from .models import ReversibleVisionTransformer, reconstruction_error
from .models.timm_vit import ReversibleTimmVisionTransformer, TimmBlockResiduals, make_reversible
from .reversible import GridRangeError, NonFiniteActivationError, ReconstructionError
from ._hub import PretrainedWeightsNotFoundError

__version__ = '0.1.0'
