from .vit_small_cifar import *
