from .vit_small_cifar import *
from .reversible_vit import ReversibleVisionTransformer, QuantizedReversibleVisionTransformer, reconstruction_error
from .revvit import *
from .bdia_vit import *
from .momentum_revvit import *
from .timm_vit import *
