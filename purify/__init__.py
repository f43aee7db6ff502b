"""BCM network, Bidirectional Consistency Training, samplers, inversion, the drop-in ``BCMPurifier`` and the
defence registry (``make_defence``)."""
from .base import Defence
from .bcm import BCM, BCMConfig
from .bct import BCTLoss, LossConfig
from .defences import DEFENCES, make_defence, parse_defence
from .network import NetworkConfig
from .presets import Preset, load_preset
from .purifier import BCMPurifier, DiffusionPurifier, clamp_straight_through, image_noise
from .sampling import (invert, reconstruction_mse, sample_ancestral, sample_combined, sample_onestep,
                       sample_zigzag)

__all__ = ["BCM", "BCMConfig", "BCMPurifier", "BCTLoss", "DEFENCES", "Defence", "DiffusionPurifier", "LossConfig",
           "NetworkConfig", "Preset", "clamp_straight_through", "image_noise", "invert", "load_preset", "make_defence",
           "parse_defence", "reconstruction_mse", "sample_ancestral", "sample_combined", "sample_onestep",
           "sample_zigzag"]
