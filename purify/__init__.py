"""BCM network, Bidirectional Consistency Training, samplers, inversion and the drop-in ``BCMPurifier``."""
from .bcm import BCM, BCMConfig
from .bct import BCTLoss, LossConfig
from .network import NetworkConfig
from .presets import Preset, load_preset
from .purifier import BCMPurifier, image_noise
from .sampling import (invert, reconstruction_mse, sample_ancestral, sample_combined, sample_onestep,
                       sample_zigzag)

__all__ = ["BCM", "BCMConfig", "BCMPurifier", "BCTLoss", "LossConfig", "NetworkConfig", "Preset", "image_noise", "invert",
           "load_preset", "reconstruction_mse", "sample_ancestral", "sample_combined", "sample_onestep",
           "sample_zigzag"]
