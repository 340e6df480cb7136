from .vit_small_cifar import *
from .reversible_vit import ReversibleVisionTransformer, reconstruction_error
from .revvit import *
from .bdia_vit import *
from .momentum_revvit import *
