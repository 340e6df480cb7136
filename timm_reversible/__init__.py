""" timm-reversible: memory-saving reversible Vision Transformers for timm.

Importing the package registers its models with timm:

    import timm, timm_reversible
    model = timm.create_model('vit_small_cifar')
"""
from .models import *

__version__ = '0.1.0'
