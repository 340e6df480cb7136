""" The reversible core, in layers whose imports go one way: engine <- grid <- couplings <- models. """
from .engine import *
from .grid import *
from .couplings import *
